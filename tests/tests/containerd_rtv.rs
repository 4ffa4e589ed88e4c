//! rtv driven by the real containerd 1.6 through its runc shim
//! (`ctr run --runtime io.containerd.runc.v2 --runc-binary <rtv>`): the
//! same scenarios as containerd_runc.rs, each in a private containerd,
//! each followed by the check that nothing is left behind. Every
//! container runs in its own micro-VM.

use std::path::PathBuf;

use rtv_tests::containerd::{self, with_containerd};
use rtv_tests::one_vm_at_a_time;

/// The rtv binary, with the guest kernel, initramfs and VMM in the
/// environment that containerd, its shim and rtv inherit.
fn rtv() -> PathBuf {
    rtv_tests::rtv_with_artifacts().expect("building rtv and its guest")
}

#[test]
fn ctr_run_rm_prints_and_returns_the_exit_code() {
    let rtv = rtv();
    let _one = one_vm_at_a_time();
    with_containerd("rtv-run-rm", |c| containerd::scenario_run_rm(c, &rtv));
}

#[test]
fn ctr_run_with_stdin() {
    let rtv = rtv();
    let _one = one_vm_at_a_time();
    with_containerd("rtv-stdin", |c| containerd::scenario_stdin(c, &rtv));
}

#[test]
fn ctr_detached_exec_ps_kill_delete() {
    let rtv = rtv();
    let _one = one_vm_at_a_time();
    with_containerd("rtv-detached", |c| {
        containerd::scenario_detached_lifecycle(c, &rtv)
    });
}

#[test]
fn ctr_run_with_a_tty() {
    let rtv = rtv();
    let _one = one_vm_at_a_time();
    with_containerd("rtv-tty", |c| containerd::scenario_tty(c, &rtv));
}
