//! End to end: our kernel and initramfs, booted by our VMM on the real
//! /dev/kvm, reach the agent's readiness line, and the VMM process ends
//! cleanly when the guest powers off, or with status 2 when it panics.

use std::time::Duration;

use rtv_tests::{one_vm_at_a_time, rtv_vmm_command, BootSpec, VmProcess, BOOT_TIMEOUT, READY_LINE};

fn boot_to_ready_and_poweroff(protocol: &'static str, vcpus: u8, up: bool) {
    let spec = BootSpec {
        protocol,
        vcpus,
        up,
        // pr_info shows: the kernel says how many CPUs it brought up.
        append: "rtv.poweroff loglevel=7".into(),
        ..Default::default()
    };
    let mut vm = VmProcess::spawn(rtv_vmm_command(&spec).unwrap()).unwrap();
    let ready = vm.wait_for_line(READY_LINE, BOOT_TIMEOUT).unwrap();
    eprintln!(
        "{protocol}, {vcpus} vCPU(s), {} kernel: ready after {:.2}s",
        if up { "UP" } else { "SMP" },
        ready.at.as_secs_f64()
    );
    vm.wait_for_line("rtv-agent: powering off", Duration::from_secs(60))
        .unwrap();
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    let stderr = vm.take_stderr();
    assert_eq!(status.code(), Some(0), "VMM stderr: {stderr}");
    // Nothing else came before the readiness line but kernel messages.
    assert!(
        vm.seen
            .iter()
            .all(|l| !l.text.contains("rtv-agent: mounting")),
        "{}",
        vm.transcript()
    );
    let line = |needle: &str| vm.seen.iter().any(|l| l.text.contains(needle));
    let version = vm
        .seen
        .iter()
        .find(|l| l.text.contains("Linux version"))
        .map(|l| l.text.clone())
        .unwrap_or_else(|| panic!("no version line: {}", vm.transcript()));
    // The version string names SMP kernels ("#1 SMP ...").
    assert_eq!(version.contains("#1 SMP "), !up, "{version}");
    if !up {
        let brought_up = format!("smp: Brought up 1 node, {vcpus} CPU");
        assert!(line(&brought_up), "{brought_up}: {}", vm.transcript());
    }
}

#[test]
fn boots_to_agent_readiness_with_pvh_then_with_the_64_bit_protocol() {
    let _one = one_vm_at_a_time();
    // The SMP kernel with two vCPUs, the uniprocessor kernel with one (what
    // rtv boots for a pod of one vCPU).
    boot_to_ready_and_poweroff("pvh", 2, false);
    boot_to_ready_and_poweroff("linux64", 1, true);
}

#[test]
fn guest_kernel_panic_ends_the_vmm_with_status_2() {
    // No such init: the kernel panics, resets (panic=-1), and the VMM
    // must report the panic and end rather than spin.
    let _one = one_vm_at_a_time();
    let spec = BootSpec {
        append: "rdinit=/nonexistent".into(),
        ..Default::default()
    };
    let mut vm = VmProcess::spawn(rtv_vmm_command(&spec).unwrap()).unwrap();
    let status = vm.wait_exit(BOOT_TIMEOUT).unwrap();
    let stderr = vm.take_stderr();
    assert_eq!(
        status.code(),
        Some(2),
        "console:\n{}\nstderr: {stderr}",
        vm.transcript()
    );
    assert!(stderr.contains("guest kernel panicked"), "{stderr}");
}
