//! The command line: `dmavisor run ...`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{ByteSize, RegionBacking, VmConfig};
use crate::vm::Vm;

#[derive(Parser, Debug)]
#[command(
    name = "dmavisor",
    version,
    about = "A VMM whose core is a hypervisor memory manager for guest DMA"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest; the VMM exits when the guest reboots (0), panics (3) or fails.
    Run(RunArgs),
    /// Print a running VMM's region, allocator and virtio-dma state (from its --api-sock).
    Stat(StatArgs),
    /// Send one control-API command to a running VMM and print its JSON reply, e.g.
    /// `dmavisor api --api-sock S migrate frames=64` (test commands need `run --test-commands`; see
    /// docs/api.md).
    Api(ApiArgs),
}

#[derive(Args, Debug)]
struct ApiArgs {
    /// The control socket of a `dmavisor run --api-sock PATH`.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// The command: stat, pin-churn, pin-churn-stop, pin-longterm, unpin-longterm, migrate.
    cmd: String,
    /// Arguments as key=value (numbers are sent as numbers; 0x prefixes allowed).
    #[arg(value_name = "KEY=VALUE", value_parser = parse_api_arg)]
    args: Vec<(String, serde_json::Value)>,
}

fn parse_api_arg(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE; e.g. gpa=0x20000000 len=4M"))?;
    let number = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v
            .parse::<u64>()
            .ok()
            .or_else(|| v.parse::<ByteSize>().ok().map(|b| b.0)),
    };
    let value = number.map_or_else(|| serde_json::Value::from(v), serde_json::Value::from);
    Ok((k.to_string(), value))
}

#[derive(Args, Debug)]
struct StatArgs {
    /// The control socket of a `dmavisor run --api-sock PATH`.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Print the raw JSON reply instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest kernel: a bzImage or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs for the guest.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: serial console, reboot=k, panic=-1).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest RAM, e.g. size=512M (default 512M).
    #[arg(long, value_name = "size=SIZE", value_parser = parse_size_option("--memory"))]
    memory: Option<ByteSize>,
    /// Number of vCPUs (default 1).
    #[arg(long, value_name = "N")]
    cpus: Option<u8>,
    /// The guest's DMA window, its CMA area, e.g. size=64M (default 64M; size=0 disables).
    #[arg(long = "dma-window", value_name = "size=SIZE", value_parser = parse_size_option("--dma-window"))]
    dma_window: Option<ByteSize>,
    /// The host contiguous region behind DMA mappings, e.g. size=128M,backing=hugetlb
    /// (backing: auto, dma-heap, hugetlb-1g, hugetlb, memfd; default: the window's size, auto);
    /// host-phys=on tells the guest the host-physical address of each mapping (default off).
    #[arg(long, value_name = "size=SIZE,backing=KIND,host-phys=on|off", value_parser = parse_region)]
    region: Option<RegionArg>,
    /// Pass a host PCI device bound to vfio-pci through to the guest (repeatable), e.g.
    /// vfio=/sys/bus/pci/devices/0000:00:04.0,dma=mapped. dma=mapped (default): the device may
    /// DMA only to the ranges the guest MAPs through virtio-dma; dma=all: to all guest memory,
    /// pinned for the VM's life.
    #[arg(long = "device", value_name = "vfio=PATH[,dma=mapped|all]", value_parser = |s: &str| s.parse::<crate::config::DeviceConfig>())]
    devices: Vec<crate::config::DeviceConfig>,
    /// A TOML or JSON file with the same settings; flags given as well override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve the control API (JSON over this Unix socket; see `dmavisor stat`).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Turn on the control API's test commands (pin churn, long-term pins, forced migration,
    /// stalling the virtio-dma device).
    #[arg(long, requires = "api_sock")]
    test_commands: bool,
    /// The one file or block device that the `pin-churn` test command may overwrite.
    #[arg(long, value_name = "PATH", requires = "test_commands")]
    pin_target: Option<PathBuf>,
}

/// `--region` as given: only the keys present override the configuration.
#[derive(Clone, Debug, Default)]
struct RegionArg {
    size: Option<ByteSize>,
    backing: Option<RegionBacking>,
    host_phys: Option<bool>,
}

fn parse_region(s: &str) -> Result<RegionArg, String> {
    let mut arg = RegionArg::default();
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("size", v)) => arg.size = Some(v.parse::<ByteSize>().map_err(|e| e.to_string())?),
            Some(("backing", v)) => arg.backing = Some(v.parse()?),
            Some(("host-phys", "on")) => arg.host_phys = Some(true),
            Some(("host-phys", "off")) => arg.host_phys = Some(false),
            _ => {
                return Err(format!(
                    "`{part}` in --region {s}: the accepted form is --region size=SIZE,backing=auto|dma-heap|hugetlb-1g|hugetlb|memfd,host-phys=on|off"
                ))
            }
        }
    }
    Ok(arg)
}

/// Parses `size=SIZE` (or a bare `SIZE`) for the option `flag`.
fn parse_size_option(flag: &'static str) -> impl Fn(&str) -> Result<ByteSize, String> + Clone {
    move |s: &str| {
        let value = match s.split_once('=') {
            Some(("size", v)) => v,
            Some((key, _)) => {
                return Err(format!(
                    "unknown key `{key}` in {flag} {s}; the accepted form is {flag} size=SIZE, e.g. size=512M"
                ))
            }
            None => s,
        };
        value.parse::<ByteSize>().map_err(|e| e.to_string())
    }
}

impl Cli {
    /// Runs the command; returns the process exit status.
    pub fn execute(self) -> anyhow::Result<i32> {
        match self.command {
            Command::Run(args) => run(args),
            Command::Api(args) => {
                let mut req = serde_json::json!({ "cmd": args.cmd });
                for (k, v) in args.args {
                    req[k] = v;
                }
                println!("{}", crate::api::send(&args.api_sock, &req)?);
                Ok(0)
            }
            Command::Stat(args) => {
                let reply = crate::api::stat(&args.api_sock)?;
                if args.json {
                    println!("{}", serde_json::to_string(&reply)?);
                } else {
                    print!("{}", crate::api::summary(&reply));
                }
                Ok(0)
            }
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<i32> {
    let api_sock = args.api_sock.clone();
    let tests = crate::api::TestCommands {
        enabled: args.test_commands,
        pin_target: args.pin_target.clone(),
    };
    let config = args.into_config()?;
    config.validate()?;
    tracing::info!(?config, "starting VM");
    let vm = Vm::build(&config).context("cannot start the VM")?;
    let outcome = vm.run(api_sock.as_deref(), tests)?;
    if outcome.guest_panicked {
        eprintln!("dmavisor: the guest kernel panicked");
    } else if outcome.exit_code() != 0 {
        eprintln!(
            "dmavisor: the guest stopped abnormally: {:?}",
            outcome.reason
        );
    }
    Ok(outcome.exit_code())
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<VmConfig> {
        let mut config = match (&self.config, &self.kernel) {
            (Some(file), _) => VmConfig::from_file(file)?,
            (None, Some(kernel)) => VmConfig::with_kernel(kernel.clone()),
            (None, None) => anyhow::bail!(
                "no guest kernel: pass --kernel PATH (resources/build-guest.sh builds target/guest/kernel) or set `kernel` in a --config FILE"
            ),
        };
        if let Some(k) = self.kernel {
            config.kernel = k;
        }
        if let Some(i) = self.initrd {
            config.initrd = Some(i);
        }
        if let Some(c) = self.cmdline {
            config.cmdline = Some(c);
        }
        if let Some(m) = self.memory {
            config.memory.size = m;
        }
        if let Some(n) = self.cpus {
            config.cpus = n;
        }
        if let Some(w) = self.dma_window {
            config.dma_window.size = w;
        }
        // Devices on the command line add to those in the file.
        config.devices.extend(self.devices);
        if let Some(r) = self.region {
            if let Some(size) = r.size {
                config.region.size = Some(size);
            }
            if let Some(backing) = r.backing {
                config.region.backing = backing;
            }
            if let Some(host_phys) = r.host_phys {
                config.region.host_phys = host_phys;
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_arguments_are_numbers_sizes_or_strings() {
        let v = |s: &str| parse_api_arg(s).unwrap();
        assert_eq!(v("frames=32"), ("frames".into(), 32.into()));
        assert_eq!(v("gpa=0x20000000"), ("gpa".into(), 0x2000_0000u64.into()));
        assert_eq!(v("len=64M"), ("len".into(), (64u64 << 20).into()));
        assert_eq!(
            v("target=/dev/loop0"),
            ("target".into(), "/dev/loop0".into())
        );
        assert!(parse_api_arg("frames").unwrap_err().contains("KEY=VALUE"));
    }

    #[test]
    fn size_options_accept_key_value_and_bare() {
        let p = parse_size_option("--memory");
        assert_eq!(p("size=1G").unwrap(), ByteSize(1 << 30));
        assert_eq!(p("256M").unwrap(), ByteSize(256 << 20));
        let e = p("sz=1G").unwrap_err();
        assert!(
            e.contains("unknown key `sz`") && e.contains("size=SIZE"),
            "{e}"
        );
        assert!(p("size=lots").unwrap_err().contains("\"lots\""));
    }

    #[test]
    fn region_option_parses_and_names_mistakes() {
        let r = parse_region("size=128M,backing=memfd").unwrap();
        assert_eq!(
            (r.size, r.backing),
            (Some(ByteSize(128 << 20)), Some(RegionBacking::Memfd))
        );
        let r = parse_region("backing=dma-heap").unwrap();
        assert_eq!((r.size, r.backing), (None, Some(RegionBacking::DmaHeap)));
        assert!(parse_region("backing=gold")
            .unwrap_err()
            .contains("auto, dma-heap, hugetlb-1g, hugetlb, memfd"));
        assert!(parse_region("sise=1G")
            .unwrap_err()
            .contains("size=SIZE,backing="));
        assert_eq!(parse_region("size=64M").unwrap().host_phys, None);
        assert_eq!(
            parse_region("backing=hugetlb,host-phys=on")
                .unwrap()
                .host_phys,
            Some(true)
        );
        assert_eq!(
            parse_region("host-phys=off").unwrap().host_phys,
            Some(false)
        );
        assert!(parse_region("host-phys=yes")
            .unwrap_err()
            .contains("host-phys=on|off"));
        assert!(
            !crate::config::RegionConfig::default().host_phys,
            "off by default"
        );
    }

    #[test]
    fn flags_override_config_file() {
        let dir = std::env::temp_dir().join(format!("dmavisor-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.toml");
        std::fs::write(&f, "kernel = \"/k\"\ncpus = 2\n[memory]\nsize = \"1G\"\n").unwrap();
        let cli = Cli::try_parse_from([
            "dmavisor",
            "run",
            "--config",
            f.to_str().unwrap(),
            "--cpus",
            "3",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("parsed as run");
        };
        let c = args.into_config().unwrap();
        assert_eq!((c.cpus, c.memory.size), (3, ByteSize(1 << 30)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
