# Sourced by the project's scripts. True when this host's /dev/kvm can run stock guests (a CPU
# with VT-x/AMD-V and KVM that is not PVM); otherwise guests run inside the sandbox host.
# DMAVISOR_TEST_MODE=direct|sandbox overrides, as it does for the test harness.
host_runs_stock_guests() {
  case "${DMAVISOR_TEST_MODE:-auto}" in
    direct) return 0 ;;
    sandbox) return 1 ;;
  esac
  [ -e /dev/kvm ] && [ ! -e /sys/module/kvm_pvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo
}
