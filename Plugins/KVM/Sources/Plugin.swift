// The plugin entry and the npt_backend_ops table of the KVM backend (libnptkit-kvm.so).
//
// Only the C ABI (include/nptkit.h, through CNPTKit) crosses the boundary: this module links
// neither libnptkit.so nor NPTCore. What the plugin needs from the core comes in the npt_host_api
// table given to npt_plugin_entry.
import CKVM
import CNPTKit
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

let pluginABIMajor = UInt32(NPT_ABI_VERSION_MAJOR)
let pluginABIMinor = UInt32(NPT_ABI_VERSION_MINOR)
/// NPT_ABI_VERSION (the header's function-like macro is not imported by Swift).
let pluginABIVersion: UInt32 = (pluginABIMajor << 16) | pluginABIMinor

/// The core's table, kept by npt_plugin_entry (its address; 0 before the first load).
let hostAPIAddress = Atomic<UInt>(0)
var hostAPI: UnsafePointer<npt_host_api>? {
    UnsafePointer(bitPattern: hostAPIAddress.load(ordering: .acquiring))
}

/// npt_backend_ops has no error-string channel, so the plugin keeps the detail of its last failure
/// (process-wide) and exports it as npt_kvm_last_error (see below).
let lastError = Mutex<String>("")
func fail(_ s: npt_status, _ message: String) -> npt_status {
    lastError.withLock { $0 = message }
    return s
}
func fail(_ e: Errno, _ what: String) -> npt_status {
    fail(NPT_ERR_BACKEND, "\(what): \(e) (errno \(e.rawValue))")
}

/// Copies the detail of the plugin's last failure into buf (NUL-terminated, truncated to buf_len)
/// and returns its full length. Not part of npt_backend_ops: a tool finds it with dlsym.
@_cdecl("npt_kvm_last_error")
public func npt_kvm_last_error(_ buf: UnsafeMutablePointer<CChar>?, _ len: Int) -> Int {
    let s = lastError.withLock { $0 }
    let bytes = Array(s.utf8)
    if let buf, len > 0 {
        let n = min(bytes.count, len - 1)
        for i in 0..<n { buf[i] = CChar(bitPattern: bytes[i]) }
        buf[n] = 0
    }
    return bytes.count
}

/// The capabilities this backend advertises.
///  - RUN: it runs real x86-64 guest code in a KVM VM.
///  - MBEC_EMULATION: vcpu_set_hierarchy exposes a hierarchy as a memslot layout of the VM
///    (Layout.swift; per VM: vCPUs in different hierarchies take turns at the layout gate, Gate.swift).
///  - PERSISTENT_MEMORY: NVDIMM ranges backed by a file (or a real NVDIMM region), the vFHA as a
///    KVM_MEM_READONLY memslot when trapped, physical flushes as msync (Pmem.swift).
///  - PRIVILEGED_MODE: vCPUs are stopped by the kick; the region is a memslot (Region.swift).
///  - EXIT_ON_ESCALATE: the IDT page left out of the user layout (Escalation.swift), where the probe
///    at load finds that every entry path from CPL 3 stops before CPL 0 (escalation_probe.c).
/// Not advertised: EXIT_ON_RETURN (KVM gives no exit on a return to user mode: a VM needs
/// mbec_mode lazy or violation-only), LINEAR_MODE_INFO.
// NPT_CAP_* are UINT64_C() macros, which Swift does not import: the values are copied here.
let capMBECEmulation: UInt64 = 1 << 0  // NPT_CAP_MBEC_EMULATION
let capRun: UInt64 = 1 << 4            // NPT_CAP_RUN
let capPrivilegedMode: UInt64 = 1 << 5 // NPT_CAP_PRIVILEGED_MODE (Region.swift)
let capExitOnEscalate: UInt64 = 1 << 1 // NPT_CAP_EXIT_ON_ESCALATE (Escalation.swift), where the probe allows it
var kvmCapabilities: UInt64 {
    capRun | capMBECEmulation | capPrivilegedMode | capPersistentMemory | (escalationSupport.usable ? capExitOnEscalate : 0)
}

nonisolated(unsafe) let kvmOps: UnsafeMutablePointer<npt_backend_ops> = {
    let p = UnsafeMutablePointer<npt_backend_ops>.allocate(capacity: 1)
    var o = npt_backend_ops()
    o.abi_version = pluginABIVersion
    o.size = UInt32(MemoryLayout<npt_backend_ops>.size)
    o.name = UnsafePointer(strdup("kvm"))
    o.description = UnsafePointer(strdup("real x86-64 guest code through /dev/kvm (hierarchies as memslot layouts); escalation exit: "
        + (escalationSupport.usable ? "yes, " : "no: ") + escalationSupport.reason))
    o.capabilities = kvmCapabilities
    o.guest_isa = UInt64(NPT_GUEST_ISA_X86_64)
    o.backend_data = nil
    o.vm_create = { _, vm, config, out in KVMVM.create(handle: vm, config: config, out: out) }
    o.vm_destroy = { d in if let d { Unmanaged<KVMVM>.fromOpaque(d).release() } }
    o.memory_write = { d, gpa, data, len in KVMVM.from(d).write(gpa, data, len) }
    o.memory_read = { d, gpa, data, len in KVMVM.from(d).read(gpa, data, len) }
    o.vcpu_create = { d, index, out in KVMVM.from(d).createVCPU(index, out) }
    o.vcpu_destroy = { d in if let d { Unmanaged<KVMVCPU>.fromOpaque(d).release() } }
    o.vcpu_get_regs = { d, r in KVMVCPU.from(d).getRegsWithRegion(r) }
    o.vcpu_set_regs = { d, r in KVMVCPU.from(d).setRegsWithRegion(r) }
    o.vcpu_set_hierarchy = { d, h in KVMVCPU.from(d).setHierarchy(h) }
    o.vcpu_set_exit_controls = { d, c in KVMVCPU.from(d).setExitControls(c) }
    o.invalidate = { d, h, gpa, size in KVMVM.from(d).invalidateWithRegion(h, gpa, size) }
    o.vcpu_run = { d, e in KVMVCPU.from(d).runWithRegion(e) }
    o.vcpu_inject_fault = { d, vector, code, address in KVMVCPU.from(d).injectFault(vector, code, address) } // Inject.swift
    o.vcpu_kick = { d in KVMVCPU.from(d).kick() }
    o.define_region = { d, gpa, size, host, c, len in KVMVM.from(d).defineRegion(gpa, size, host, c, len) }
    // Persistent memory (Pmem.swift)
    o.host_pmem_count = { _, count in hostPmemCount(count) }
    o.host_pmem_get = { _, index, region, targets, cap in hostPmemGet(index, region, targets, cap) }
    o.attach_pmem = { d, gpa, size, region, off, hostOff in KVMVM.from(d).attachPmem(gpa, size, region, off, hostOff) }
    o.define_flush_hint_page = { d, gpa, hostOff, trapped in KVMVM.from(d).defineFlushHintPage(gpa, hostOff, trapped != 0) }
    o.physical_flush = { d, region, controller, address in KVMVM.from(d).physicalFlush(region, controller, address) }
    o.vcpu_fence = { d in KVMVCPU.from(d).fence() }
    o.vcpu_complete_trapped_write = { d in KVMVCPU.from(d).completeTrappedWrite() }
    // KVM cannot count guest writes that do not exit (the vFHA is then an ordinary RAM page).
    o.untrapped_flush_hint_writes = { _ in 0 }
    o.power_failure = nil       // unsupported: the host cannot cut its own power
    p.initialize(to: o)
    return p
}()

/// The one symbol the plugin exports for the core: checks the host's ABI major, keeps its table,
/// and returns the ops.
@_cdecl("npt_plugin_entry")
public func npt_plugin_entry(_ host: UnsafePointer<npt_host_api>?,
                             _ ops: UnsafeMutablePointer<UnsafePointer<npt_backend_ops>?>?) -> npt_status {
    guard let host, let ops else { return fail(NPT_ERR_INVALID_ARGUMENT, "npt_plugin_entry: NULL host or ops") }
    let v = host.pointee.abi_version
    guard v >> 16 == pluginABIMajor else {
        return fail(NPT_ERR_ABI_MISMATCH,
                    "the kvm plugin is built for ABI \(pluginABIMajor).\(pluginABIMinor), the host is \(v >> 16).\(v & 0xFFFF)")
    }
    hostAPIAddress.store(UInt(bitPattern: host), ordering: .releasing)
    _ = ckvm_kick_signal_install()
    ops.pointee = UnsafePointer(kvmOps)
    return NPT_OK
}
