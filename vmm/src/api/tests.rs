use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::types::*;
use super::*;
use crate::dma::DmaSlot;

fn sock(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("dmavisor-api-{}-{name}.sock", std::process::id()))
}

fn error_of(answer: &str) -> String {
    let v: Value = serde_json::from_str(answer).unwrap();
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {answer}"))
        .to_string()
}

#[test]
fn stat_without_dma_path_and_bad_requests() {
    let path = sock("a");
    let server = ApiServer::bind(&path, DmaSlot::default(), TestCommands::default()).unwrap();
    let answer: StatReply = serde_json::from_str(&server.answer("{\"cmd\":\"stat\"}")).unwrap();
    assert!(
        answer.region.is_none() && answer.device.is_none(),
        "{answer:?}"
    );
    assert!(summary(&answer).contains("not set up"));
    let e = error_of(&server.answer("{\"cmd\":\"reboot\"}"));
    assert!(
        e.contains("unknown variant `reboot`") && e.contains("migrate"),
        "{e}"
    );
    let e = error_of(&server.answer("stat please"));
    assert!(e.contains("not a valid request"), "{e}");
    let e = error_of(&server.answer("{\"cmd\":\"migrate\",\"frames\":-1}"));
    assert!(e.contains("frames") || e.contains("invalid value"), "{e}");
    let e = error_of(&server.answer("{\"cmd\":\"migrate\",\"frames\":1,\"extra\":2}"));
    assert!(e.contains("unknown field `extra`"), "{e}");
    let e = error_of(&server.answer("{\"cmd\":\"pin-longterm\",\"gpa\":0}"));
    assert!(e.contains("missing field `len`"), "{e}");
    // Test commands are off without --test-commands, and say how to turn them on.
    for cmd in [
        "{\"cmd\":\"pin-churn\"}",
        "{\"cmd\":\"migrate\",\"frames\":1}",
        "{\"cmd\":\"unpin-longterm\"}",
        "{\"cmd\":\"dma-stall\",\"on\":1}",
    ] {
        let e = error_of(&server.answer(cmd));
        assert!(
            e.contains("start dmavisor with --test-commands"),
            "{cmd}: {e}"
        );
    }
    // A second VMM on the same path is refused; the socket goes away with the server.
    assert!(matches!(
        ApiServer::bind(&path, DmaSlot::default(), TestCommands::default()),
        Err(ApiError::InUse(_))
    ));
    drop(server);
    assert!(!path.exists());
}

#[test]
fn test_commands_need_the_dma_path() {
    let path = sock("c");
    let tests = TestCommands {
        enabled: true,
        pin_target: None,
    };
    let server = ApiServer::bind(&path, DmaSlot::default(), tests).unwrap();
    for cmd in [
        "{\"cmd\":\"pin-churn\"}",
        "{\"cmd\":\"pin-longterm\",\"gpa\":0,\"len\":1}",
        "{\"cmd\":\"migrate\",\"frames\":1}",
        "{\"cmd\":\"dma-stall\",\"on\":0}",
    ] {
        let e = error_of(&server.answer(cmd));
        assert!(e.contains("needs the DMA path"), "{cmd}: {e}");
    }
}

#[test]
fn client_round_trip_over_the_socket() {
    let path = sock("b");
    let server = ApiServer::bind(&path, DmaSlot::default(), TestCommands::default()).unwrap();
    let client = {
        let path = path.clone();
        std::thread::spawn(move || stat(&path))
    };
    // Serve the one connection as the API worker would.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.accept_one() {
        assert!(Instant::now() < deadline, "the client never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    let v = client.join().unwrap().unwrap();
    assert!(v.region.is_none());
    let e = stat(&sock("nobody")).unwrap_err().to_string();
    assert!(e.contains("is `dmavisor run --api-sock"), "{e}");
}

/// Every key of a JSON value, at every depth.
fn keys(v: &Value, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, v) in m {
            out.push(k.clone());
            keys(v, out);
        }
    }
}

/// docs/api.md documents exactly the API the types define: a section per command, example
/// requests that parse, every argument and every reply key named.
#[test]
fn docs_api_md_is_in_step_with_the_types() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap();
    let mut examples: Vec<Request> = Vec::new();
    for line in doc
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("{\"cmd\""))
    {
        examples.push(
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("docs/api.md example {line} is not a request: {e}")),
        );
    }
    for name in Request::NAMES {
        assert!(
            doc.lines()
                .any(|l| l.starts_with("## ") && l.contains(&format!("`{name}`"))),
            "docs/api.md has no section for `{name}`"
        );
        assert!(
            examples.iter().any(|r| r.name() == name),
            "docs/api.md has no example request for `{name}`"
        );
    }
    let samples = [
        Request::PinChurn {
            io_kib: 1,
            hold_us: 1,
            gap_us: 1,
        },
        Request::PinLongterm { gpa: 1, len: 1 },
        Request::Migrate { frames: 1 },
        Request::DmaStall { on: 1 },
    ];
    let full_stat = StatReply {
        region: Some(RegionStat {
            extents: vec![ExtentStat::default()],
            ..Default::default()
        }),
        allocator: Some(Default::default()),
        lending: Some(Default::default()),
        maps: Some(Default::default()),
        pins: Some(PinsStat {
            churn: Some(Default::default()),
            ..Default::default()
        }),
        device: Some(Default::default()),
        ..Default::default()
    };
    let mut documented = Vec::new();
    for v in samples
        .iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .chain([
            serde_json::to_value(&full_stat).unwrap(),
            serde_json::to_value(StartedReply::default()).unwrap(),
            serde_json::to_value(PinLongtermReply::default()).unwrap(),
            serde_json::to_value(UnpinLongtermReply::default()).unwrap(),
            serde_json::to_value(MigrateReply::default()).unwrap(),
            serde_json::to_value(DmaStallReply::default()).unwrap(),
            serde_json::to_value(ErrorReply {
                error: String::new(),
            })
            .unwrap(),
        ])
    {
        keys(&v, &mut documented);
    }
    for key in documented.iter().filter(|k| *k != "cmd") {
        assert!(
            doc.contains(&format!("`{key}`")),
            "docs/api.md does not name `{key}`"
        );
    }
}
