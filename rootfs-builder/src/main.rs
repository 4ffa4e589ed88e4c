//! `rtv-rootfs-builder`: writes the guest initramfs holding the agent as /init.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Pack a statically linked rtv-agent into an uncompressed cpio (newc) initramfs.
#[derive(Parser)]
#[command(name = "rtv-rootfs-builder", version)]
struct Args {
    /// The statically linked agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// A static busybox to add as /bin/busybox with common applets (test guests).
    #[arg(long)]
    busybox: Option<PathBuf>,
    /// Where to write the initramfs.
    #[arg(long, short)]
    output: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bytes = rtv_rootfs_builder::build(&args.agent, args.busybox.as_deref())?;
    // Write beside the target and rename, so readers never see half a file.
    let tmp = args.output.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &args.output)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", args.output.display()));
    }
    eprintln!(
        "rtv-rootfs-builder: wrote {} ({} bytes)",
        args.output.display(),
        bytes.len()
    );
    Ok(())
}
