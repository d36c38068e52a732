//! The harness for integration tests that boot real Linux guests under dmavisor.
//!
//! Guests run on real KVM, in one of two ways, chosen automatically and logged:
//! - **direct**: the host's `/dev/kvm` can run stock guests (the CPU has vmx or svm and KVM is
//!   not PVM), so `dmavisor` runs here;
//! - **sandbox**: otherwise the same `dmavisor` binary runs inside the sandbox host
//!   (`resources/sandbox/run.sh`: QEMU TCG with an emulated SVM CPU and nested KVM).
//!
//! `DMAVISOR_TEST_MODE=direct|sandbox` overrides the choice.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Where a guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Sandbox,
}

fn host_can_run_stock_guests() -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err("/dev/kvm is PVM (kvm_pvm loaded)".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Err("the CPU has neither vmx nor svm".into());
    }
    Ok(())
}

/// The mode for this test run (decided once, and logged).
pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| {
        let (mode, why) = match std::env::var("DMAVISOR_TEST_MODE").as_deref() {
            Ok("direct") => (Mode::Direct, "DMAVISOR_TEST_MODE=direct".to_string()),
            Ok("sandbox") => (Mode::Sandbox, "DMAVISOR_TEST_MODE=sandbox".to_string()),
            _ => match host_can_run_stock_guests() {
                Ok(()) => (Mode::Direct, "host KVM runs stock guests".to_string()),
                Err(why) => (Mode::Sandbox, why),
            },
        };
        eprintln!("[harness] guests run {mode:?} ({why})");
        mode
    })
}

/// The sandbox host's kernel (`DMAVISOR_SANDBOX_KERNEL`): `project` (the default, with CMA and
/// the host CMA heap) or `debian` (Debian's own, CMA off).
pub fn sandbox_kernel() -> String {
    std::env::var("DMAVISOR_SANDBOX_KERNEL").unwrap_or_else(|_| "project".into())
}

/// Whether the host the guests run on has a CMA dma-buf heap: the project's sandbox host kernel
/// does (`cma=1G`); Debian's does not; a host running guests directly, if it has one.
pub fn guest_host_has_cma_heap() -> bool {
    match mode() {
        Mode::Sandbox => sandbox_kernel() != "debian",
        Mode::Direct => std::fs::read_dir("/dev/dma_heap").is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy() != "system")
        }),
    }
}

/// The dmavisor binary under test.
pub fn dmavisor_bin() -> PathBuf {
    std::env::var_os("DMAVISOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/dmavisor"))
}

fn require(path: &Path) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run resources/test.sh, or build it with resources/build-guest.sh, \
         `cargo build --release -p vmm` and resources/sandbox/build.sh",
        path.display()
    );
    path.to_path_buf()
}

/// The guest kernel and initramfs built by resources/build-guest.sh.
pub fn guest_kernel() -> PathBuf {
    require(&root().join("target/guest/kernel"))
}

pub fn guest_initramfs() -> PathBuf {
    require(&root().join("target/guest/initramfs.cpio.gz"))
}

/// What a dmavisor run left behind.
#[derive(Debug)]
pub struct GuestRun {
    /// Everything the guest console and dmavisor printed.
    pub console: String,
    /// dmavisor's exit status; `None` if it never exited (timeout) or the sandbox failed.
    pub exit_code: Option<i32>,
    /// The harness stopped the run because the sandbox host reported a stalled CPU or oopsed.
    pub sandbox_stalled: bool,
}

impl GuestRun {
    /// The key=value pairs of every `DMAVISOR-RESULT` line, in order.
    pub fn results(&self) -> Vec<HashMap<String, String>> {
        self.console
            .lines()
            .filter_map(|l| l.split_once("DMAVISOR-RESULT ").map(|(_, rest)| rest))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.trim_end_matches('\r').to_string()))
                    .collect()
            })
            .collect()
    }

    /// The first reported value of `key`.
    pub fn result(&self, key: &str) -> Option<String> {
        self.results().into_iter().find_map(|m| m.get(key).cloned())
    }

    /// The first reported value of `key`, parsed; panics with the console if absent.
    pub fn number(&self, key: &str) -> i64 {
        let v = self
            .result(key)
            .unwrap_or_else(|| panic!("guest reported no {key}; console:\n{}", self.console));
        v.parse()
            .unwrap_or_else(|_| panic!("guest reported {key}={v:?}, not a number"))
    }

    /// The result line that has `key=value`.
    pub fn line_with(&self, key: &str, value: &str) -> Option<HashMap<String, String>> {
        self.results()
            .into_iter()
            .find(|m| m.get(key).map(String::as_str) == Some(value))
    }
}

// Guests boot one at a time: the machine has two cores and a sandbox host wants both.
static ONE_GUEST_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `dmavisor ARGS...` on real KVM (directly or in the sandbox host) with a time limit.
pub fn run_dmavisor(args: &[String], timeout: Duration) -> GuestRun {
    run_dmavisor_with_input(args, None, timeout)
}

/// `resources/sandbox/run.sh` with the guest kernel and initramfs copied in (guests may be named
/// in a config file rather than on the command line); the caller adds `-- COMMAND`.
fn sandbox_command(timeout: Duration, bin: &Path) -> Command {
    sandbox_command_with(timeout, bin, None)
}

fn sandbox_command_with(timeout: Duration, bin: &Path, vfio: Option<&str>) -> Command {
    let mut c = Command::new(root().join("resources/sandbox/run.sh"));
    if let Some(mode) = vfio {
        c.args(["--vfio", mode]);
    }
    c.arg("--timeout")
        .arg(timeout.as_secs().to_string())
        .args(["--with".as_ref(), guest_kernel().as_os_str()])
        .args(["--with".as_ref(), guest_initramfs().as_os_str()])
        .env("DMAVISOR_BIN", bin);
    c
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Text typed into dmavisor's standard input once the console shows `after`.
#[derive(Clone, Copy, Debug)]
pub struct ConsoleInput<'a> {
    pub after: &'a str,
    pub text: &'a str,
}

/// Like `run_dmavisor`, typing `input` (if any) into dmavisor's standard input.
pub fn run_dmavisor_with_input(
    args: &[String],
    input: Option<ConsoleInput>,
    timeout: Duration,
) -> GuestRun {
    let _one = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let bin = require(&dmavisor_bin());
    let input_file = tempfile("stdin");
    std::fs::write(&input_file, input.map_or("", |i| i.text)).expect("writing dmavisor's input");
    let make = || match mode() {
        Mode::Direct => {
            let mut c = Command::new(&bin);
            c.args(args);
            c
        }
        Mode::Sandbox if input.is_some() => {
            let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
            let after = shell_quote(input.map_or("", |i| i.after));
            // Inside the sandbox: dmavisor reads a fifo that gets the text once the console
            // shows the marker.
            let line = format!(
                "mkfifo /tmp/in; dmavisor {} </tmp/in >/tmp/out 2>&1 & vmm=$!; exec 3>/tmp/in; \
                 i=0; until grep -q {after} /tmp/out || [ $i -gt 1200 ]; do sleep 0.1; i=$((i+1)); done; \
                 cat {} >&3; exec 3>&-; wait $vmm; rc=$?; cat /tmp/out; exit $rc",
                quoted.join(" "),
                input_file.display()
            );
            let mut c = sandbox_command(timeout, &bin);
            c.args(["--with".as_ref(), input_file.as_os_str()])
                .args(["--", "sh", "-c", &line]);
            c
        }
        Mode::Sandbox => {
            let mut c = sandbox_command(timeout, &bin);
            c.arg("--").arg("dmavisor").args(args);
            c
        }
    };
    let label = format!("dmavisor {args:?}");
    let run = execute(
        make,
        timeout,
        &label,
        input.filter(|_| mode() == Mode::Direct),
    );
    let _ = std::fs::remove_file(&input_file);
    run
}

/// Runs a shell script where guests run (here, or inside the sandbox host) with `dmavisor` on
/// its PATH, e.g. to start a VM in the background and query its control API.
pub fn run_shell(script: &str, timeout: Duration) -> GuestRun {
    run_shell_with(script, timeout, None)
}

/// Where the VFIO tests' devices are: in the sandbox host (`run.sh --vfio edu`), QEMU's `edu`
/// devices; on a host that runs guests directly, the device named by `DMAVISOR_VFIO_DEVICE`
/// (bound to vfio-pci), and the error cases only where the sandbox stages them.
#[derive(Clone, Debug)]
pub struct VfioHost {
    /// A device bound to vfio-pci, alone in its IOMMU group.
    pub device: String,
    /// A device bound to vfio-pci whose group has a device bound to another driver.
    pub non_viable: Option<String>,
    /// A device bound to a driver other than vfio-pci.
    pub other_driver: Option<String>,
    /// Whether the host can be booted without an IOMMU for the "no IOMMU" error (the sandbox).
    pub can_drop_iommu: bool,
}

/// The VFIO host, or None (and why) when there is no device to pass through.
pub fn vfio_host() -> Result<VfioHost, String> {
    match mode() {
        Mode::Sandbox if sandbox_kernel() == "debian" => Err(
            "the Debian sandbox kernel has no VFIO set up (run.sh --vfio needs the project's kernel)".into(),
        ),
        Mode::Sandbox => Ok(VfioHost {
            device: "/sys/bus/pci/devices/0000:00:04.0".into(),
            non_viable: Some("/sys/bus/pci/devices/0000:01:01.0".into()),
            other_driver: Some("/sys/bus/pci/devices/0000:01:02.0".into()),
            can_drop_iommu: true,
        }),
        Mode::Direct => match std::env::var("DMAVISOR_VFIO_DEVICE") {
            Ok(device) => Ok(VfioHost {
                device,
                non_viable: None,
                other_driver: None,
                can_drop_iommu: false,
            }),
            Err(_) => Err("guests run directly here and DMAVISOR_VFIO_DEVICE names no device bound to vfio-pci".into()),
        },
    }
}

/// Like [`run_shell`], where the VFIO devices are: in the sandbox, booted with
/// `run.sh --vfio MODE` (`edu`, or `noiommu` for the same devices without an IOMMU).
pub fn run_shell_vfio(script: &str, timeout: Duration, vfio: &str) -> GuestRun {
    run_shell_with(script, timeout, Some(vfio))
}

fn run_shell_with(script: &str, timeout: Duration, vfio: Option<&str>) -> GuestRun {
    let _one = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let bin = require(&dmavisor_bin());
    let make = || match mode() {
        Mode::Direct => {
            let dir = bin
                .parent()
                .expect("the binary is in a directory")
                .to_path_buf();
            let path = std::env::var_os("PATH").unwrap_or_default();
            // The host-side check tools (resources/sandbox/tools), built by the sandbox build.
            let mut dirs = vec![dir, root().join("target/tools")];
            dirs.extend(std::env::split_paths(&path));
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(script)
                .env("PATH", std::env::join_paths(dirs).expect("PATH"));
            c
        }
        Mode::Sandbox => {
            let mut c = sandbox_command_with(timeout, &bin, vfio);
            c.args(["--", "sh", "-c", script]);
            c
        }
    };
    execute(make, timeout, &format!("sh -c {script:?}"), None)
}

/// Runs `make()`'s command with a time limit (see `execute_once`). A run that hits the limit is
/// tried once more, saying so loudly: under nested emulation a sandbox host has been seen to
/// stall now and then (docs/benchmarks.md); a guest that hangs every time still fails.
fn execute(
    make: impl Fn() -> Command,
    timeout: Duration,
    label: &str,
    input: Option<ConsoleInput>,
) -> GuestRun {
    let first = keep_console(execute_once(make(), timeout, label, input));
    let triple_fault = first.console.contains(GUEST_TRIPLE_FAULT);
    if first.exit_code.is_some() && !triple_fault {
        return first;
    }
    let tail: Vec<&str> = first.console.lines().rev().take(15).collect();
    eprintln!(
        "[harness] WARNING: {label} did not finish (stalled, triple-faulted, or hit its {}s limit); trying once more. Last lines:\n{}",
        timeout.as_secs(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let stalled = if triple_fault {
        "the guest triple-faulted (dmavisor exit 4) under host page moves"
    } else if first.sandbox_stalled {
        "the sandbox host reported a stalled CPU or an oops"
    } else {
        "no exit status within the time limit"
    };
    let second = keep_console(execute_once(make(), timeout, label, input));
    let outcome = if second.console.contains(GUEST_TRIPLE_FAULT) {
        "the retry triple-faulted too"
    } else if second.exit_code.is_some() {
        "the retry finished"
    } else {
        "the retry did not finish either"
    };
    record_retry(&format!("{label}: {stalled}; {outcome}"));
    second
}

/// With `DMAVISOR_TEST_CONSOLES=DIR`, every run's console is also written to `DIR/run-N.log`
/// (passing runs too: the guest's and the host's statistics are in them).
fn keep_console(run: GuestRun) -> GuestRun {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    if let Some(dir) = std::env::var_os("DMAVISOR_TEST_CONSOLES") {
        let path = PathBuf::from(dir).join(format!(
            "run-{}-{}.log",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let written = std::fs::create_dir_all(path.parent().expect("a directory"))
            .and_then(|()| std::fs::write(&path, &run.console));
        if let Err(e) = written {
            eprintln!("[harness] keeping the console in {}: {e}", path.display());
        }
    }
    run
}

/// What dmavisor prints when the guest triple-faults. In the sandbox host this happens now and
/// then (a few runs in a hundred of the seed scenarios, on Debian's host kernel and on the
/// project's; the last exception is a supervisor instruction fetch through a not-present or
/// reserved-bit page table entry; not traced yet, docs/benchmarks.md), so such a run is tried
/// once more and the retry is recorded like any other.
const GUEST_TRIPLE_FAULT: &str = "the guest stopped abnormally: TripleFault";

/// Where every retry of a run is recorded, one line each. `resources/test.sh` empties it before
/// the suite and prints it after, pass or fail: a retry is a failure deferred, never invisible.
pub fn retry_log() -> PathBuf {
    std::env::var_os("DMAVISOR_RETRY_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/harness-retries.log"))
}

fn record_retry(line: &str) {
    use std::io::Write;
    let path = retry_log();
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("[harness] recording a retry in {}: {e}", path.display());
    }
}

/// Runs `cmd` with a time limit, typing `input` once its output shows the marker; collects
/// everything it printed.
fn execute_once(
    mut cmd: Command,
    timeout: Duration,
    label: &str,
    input: Option<ConsoleInput>,
) -> GuestRun {
    let stdout_path = tempfile("stdout");
    let out = File::create(&stdout_path).expect("creating a temp file");
    let err = out.try_clone().expect("dup");
    let started = Instant::now();
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawning the command");
    if let (Some(i), Some(mut stdin)) = (input, child.stdin.take()) {
        let (after, text, watch) = (i.after.to_string(), i.text.to_string(), stdout_path.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                if std::fs::read_to_string(&watch).is_ok_and(|c| c.contains(&after)) {
                    let _ = stdin.write_all(text.as_bytes());
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
    // The sandbox enforces its own limit; this one is a backstop for both modes.
    let limit = timeout + Duration::from_secs(30);
    let mut polls = 0u32;
    let mut stalled = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the command") {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        polls += 1;
        // A wedged sandbox host says so on its console long before the limit: stop there
        // (run.sh stops QEMU on SIGTERM) and let the caller try again.
        if mode() == Mode::Sandbox && polls.is_multiple_of(40) && sandbox_stalled(&stdout_path) {
            eprintln!(
                "[harness] WARNING: {label}: the sandbox host reports a stalled CPU; stopping it"
            );
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            stalled = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // In the sandbox, run.sh streams the sandbox console (and so dmavisor's output) to stdout.
    let console = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stdout_path);
    // The sandbox kernel panics at a stall or an oops, which may end the run before a poll saw it.
    let stalled = stalled || (mode() == Mode::Sandbox && reports_stall(&console));
    let exit_code = status.and_then(|s| s.code()).filter(|&c| {
        // 124/125: the sandbox timed out or never reported dmavisor's status.
        !(mode() == Mode::Sandbox && (c == 124 || c == 125))
    });
    eprintln!(
        "[harness] {label} -> {exit_code:?} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    GuestRun {
        console,
        exit_code,
        sandbox_stalled: stalled,
    }
}

/// Whether the sandbox host's kernel reported a CPU that stopped responding: an RCU stall, or a
/// soft lockup of a dmavisor vCPU thread inside KVM_RUN (seen now and then under nested
/// emulation; the run would otherwise sit until its time limit).
fn sandbox_stalled(console: &Path) -> bool {
    std::fs::read_to_string(console).is_ok_and(|c| reports_stall(&c))
}

/// The text test of [`sandbox_stalled`].
fn reports_stall(c: &str) -> bool {
    c.lines().any(|l| {
        // rcu_preempt on Debian's kernel, rcu_sched on the project's (not preemptible); an
        // oops in the sandbox kernel (a vCPU thread's stack overflow has been seen, see
        // docs/benchmarks.md) ends in a panic there. Not "Kernel panic": a guest's panic prints
        // that too, on the same console.
        !l.starts_with("DMAVISOR")
            && (l.contains("detected stalls on CPUs")
                || l.contains("watchdog: BUG: soft lockup")
                || l.contains("Oops: "))
    })
}

fn tempfile(what: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir().join(format!("dmavisor-test-{}-{n}-{what}", std::process::id()))
}

/// The seed 001 scenario's two runs (the kernel's CMA heap, then virtio-dma), printed; returns
/// the virtio-dma run, which must have run at least one loop.
pub fn seed001_virtio_dma_run(g: &GuestRun) -> HashMap<String, String> {
    let runs: Vec<_> = g
        .results()
        .into_iter()
        .filter(|r| r.contains_key("loops"))
        .collect();
    assert_eq!(runs.len(), 2, "console:\n{}", g.console);
    for r in &runs {
        println!(
            "{}: {} loops, {} failed; allocation p50 {} us, p99 {} us",
            r["heap"], r["loops"], r["failed_loops"], r["p50_us"], r["p99_us"]
        );
    }
    let ours = runs
        .into_iter()
        .find(|r| r["heap"].ends_with("virtio-dma"))
        .expect("virtio-dma run");
    assert!(
        ours.get("loops").and_then(|l| l.parse::<u64>().ok()) >= Some(1),
        "{ours:?}"
    );
    ours
}

/// A guest boot running one scenario of the guest init.
pub struct Boot {
    pub scenario: &'static str,
    pub kernel: PathBuf,
    pub cpus: u8,
    pub memory: &'static str,
    pub window: &'static str,
    pub extra: Vec<String>,
    pub timeout: Duration,
}

impl Boot {
    pub fn scenario(scenario: &'static str) -> Self {
        Self {
            scenario,
            kernel: guest_kernel(),
            cpus: 1,
            memory: "512M",
            window: "64M",
            extra: Vec::new(),
            timeout: Duration::from_secs(150),
        }
    }

    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            self.kernel.display().to_string(),
            "--initrd".into(),
            guest_initramfs().display().to_string(),
            "--cmdline".into(),
            format!(
                "console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario={}",
                self.scenario
            ),
            "--cpus".into(),
            self.cpus.to_string(),
            "--memory".into(),
            format!("size={}", self.memory),
            "--dma-window".into(),
            format!("size={}", self.window),
        ];
        a.extend(self.extra.iter().cloned());
        a
    }

    pub fn run(&self) -> GuestRun {
        run_dmavisor(&self.args(), self.timeout)
    }
}

/// A shell script that boots a guest running `scenario` with a control socket and a console
/// the script can type into (`echo go >&3`), sets up a loop device for O_DIRECT I/O (`$dev`),
/// reserves the region as `--region REGION`, runs `steps`, and prints dmavisor's output (also when dmavisor ended early: a write to its
/// console then fails instead of killing the script with SIGPIPE). Helpers for `steps`: `waitfor TEXT`, and
/// `api CMD KEY=VALUE...`, which prints `API CMD ... => REPLY`.
pub fn driven_script(
    scenario: &str,
    window: &str,
    region: &str,
    cmdline: &str,
    steps: &str,
) -> String {
    driven_script_with(scenario, window, region, "", cmdline, steps)
}

/// [`driven_script`] with more `dmavisor run` arguments (`args`, e.g. `--device ...`).
pub fn driven_script_with(
    scenario: &str,
    window: &str,
    region: &str,
    args: &str,
    cmdline: &str,
    steps: &str,
) -> String {
    format!(
        "trap '' PIPE; out=/tmp/dmavisor-pins.out; sock=/tmp/dmavisor-pins.sock; in=/tmp/dmavisor-pins.in; \
         rm -f $out $sock $in; mkfifo $in; \
         dd if=/dev/zero of=/tmp/dmavisor-pinio.img bs=1M count=64 2>/dev/null; \
         dev=$(losetup -f) && losetup $dev /tmp/dmavisor-pinio.img || echo LOSETUP-FAILED; \
         dmavisor run --api-sock $sock --test-commands --pin-target $dev --memory size=256M --dma-window size={window} --region {region} {args} \
           --kernel {k} --initrd {i} \
           --cmdline 'console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario={scenario} {cmdline}' \
           <$in >$out 2>&1 & \
         vmm=$!; exec 3>$in; \
         waitfor() {{ n=0; until grep -q \"$1\" $out || ! kill -0 $vmm 2>/dev/null || [ $n -gt 1800 ]; do sleep 0.1; n=$((n+1)); done; \
           grep -q \"$1\" $out || ! kill -0 $vmm 2>/dev/null || {{ echo \"WAITFOR-TIMEOUT $1; dmavisor's threads:\"; \
             for t in /proc/$vmm/task/*; do echo \"  $(cat $t/comm) $(cat $t/wchan) $(cut -d' ' -f3 $t/stat)\"; done; \
             dmavisor stat --api-sock $sock; tail -n 40 $out; kill $vmm; }}; }}; \
         api() {{ echo \"API $* => $(dmavisor api --api-sock $sock \"$@\" 2>&1)\"; }}; \
         waitfor DMAVISOR-SCENARIO; \
         n=0; until dmavisor stat --api-sock $sock | grep -q lending || [ $n -gt 600 ]; do sleep 0.1; n=$((n+1)); done; \
         {steps}; \
         wait $vmm; echo \"VMM-RC=$?\"; losetup -d $dev; cat $out",
        k = guest_kernel().display(),
        i = guest_initramfs().display(),
    )
}
