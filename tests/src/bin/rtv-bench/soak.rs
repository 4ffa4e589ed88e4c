//! `rtv-bench soak`: N container lifecycles through `rtv` (create, start,
//! exec, kill, delete) and N pods through containerd's CRI plugin on the
//! rtv shim (run, create + start, exec, stop, remove), with the host's
//! census ([`rtv_tests::soak::Census`]) after the first cycle and every
//! tenth, as a table. Fails when the last census of either is above the
//! first.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use rtv_tests::conformance::busybox_bundle;
use rtv_tests::containerd::CriRuntime;
use rtv_tests::cri;
use rtv_tests::soak::{self, Census, Places};

use super::{host_type, rtv_and_shim};

fn print_row(start: Instant) -> impl FnMut(usize, &Census, &[String]) {
    move |n, census, leaks| {
        let leaks = if leaks.is_empty() {
            String::new()
        } else {
            format!(" leaks: {}", leaks.join("; "))
        };
        println!(
            "{} {:.0} s{leaks}",
            census.row(n),
            start.elapsed().as_secs_f64()
        );
    }
}

/// `rtv-bench soak`.
pub(crate) fn soak_bench(
    cycles: usize,
    every: usize,
    rtv_only: bool,
    cri_only: bool,
) -> Result<()> {
    let (rtv, shim) = rtv_and_shim()?;
    let templates = rtv_runtime::template_dir();
    println!("host: {}", host_type());
    let mut leaked = Vec::new();

    if !cri_only {
        let work = std::env::temp_dir().join(format!("rtv-bench-soak-{}", std::process::id()));
        let root = work.join("root");
        let bundle = work.join("bundle");
        busybox_bundle(&bundle, &["sleep", "1000"])?;
        let places = Places {
            rtv_root: Some(&root),
            templates: Some(&templates),
            containerd: None,
        };
        println!("\n{cycles} lifecycles through rtv (create, start, exec, kill, delete)\n");
        println!("{} time", Census::header());
        let start = Instant::now();
        let result = soak::soak(
            cycles,
            every,
            |n| soak::rtv_cycle(&rtv, &root, &bundle, &format!("soak-{n}")),
            || Census::take(&places),
            print_row(start),
        );
        let _ = rtv_runtime::remove_tree(&work);
        leaked.extend(result?.into_iter().map(|l| format!("rtv: {l}")));
    }

    if !rtv_only {
        let handler = CriRuntime::rtv();
        let opts = cri::cri_net_options(vec![handler], shim.parent().map(PathBuf::from));
        let mut cri_leaks = Vec::new();
        cri::with_cri("rtv-bench-soak", &opts, |c, client| {
            let places = Places {
                rtv_root: None,
                templates: Some(&templates),
                containerd: Some(c),
            };
            println!(
                "\n{cycles} pods through CRI on the rtv shim, CNI bridge network \
                 (run, create + start, exec, stop, remove)\n"
            );
            println!("{} time", Census::header());
            let start = Instant::now();
            cri_leaks = soak::soak(
                cycles,
                every,
                |n| soak::cri_cycle(c, client, "rtv", n),
                || Census::take(&places),
                print_row(start),
            )?;
            Ok(())
        });
        leaked.extend(cri_leaks.into_iter().map(|l| format!("cri: {l}")));
    }
    ensure!(leaked.is_empty(), "leaked: {}", leaked.join("; "));
    println!("\nnothing leaked");
    Ok(())
}
