// The plugin entry (interface 2: npt_plugin_init with key/value arguments) and the npt_backend_ops
// table of the KVM backend (libnptkit-kvm.so).
//
// Only the C ABI (include/nptkit.h, through CNPTKit) crosses the boundary: this module links
// neither libnptkit.so nor NPTCore. What the plugin needs from the core comes in the npt_host_api
// table given to npt_plugin_init; its errors go back through that table's set_error, its statistics
// through the vm_stats / vcpu_stats operations (Stats.swift), the privileged mode comes through
// vcpu_enter_privileged / vcpu_leave_privileged (Region.swift). It exports no other symbol.
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

/// The plugin's configuration: its arguments (Plugins/KVM/README.md, "Arguments").
struct KVMConfig: Sendable {
    /// Where the file-backed host region's (unlinked) backing file is created.
    var pmemDir = "/tmp"
    /// The file-backed host region's size.
    var pmemSize: UInt64 = 64 << 20
    /// The libnvdimm sysfs tree host discovery reads (tests point it at a fixture).
    var ndRoot = "/sys/bus/nd/devices"
    /// Whether the file-backed host region reports needs_wpq_flush (0: it claims ADR, which a file
    /// does not have: the weaker guarantee the README names).
    var pmemNeedsFlush = true

    static let keys = ["pmem-dir", "pmem-size", "nd-root", "pmem-needs-flush"]

    /// Parses the arguments; a key it does not know, or a value it cannot use, is refused with why.
    static func parse(_ args: [(key: String, value: String)]) -> Result<KVMConfig, PmemError> {
        var c = KVMConfig()
        func bad(_ why: String) -> Result<KVMConfig, PmemError> { .failure(PmemError(NPT_ERR_INVALID_ARGUMENT, why)) }
        for (key, value) in args {
            switch key {
            case "pmem-dir":
                var st = stat()
                guard !value.isEmpty, stat(value, &st) == 0, st.st_mode & S_IFMT == S_IFDIR, access(value, W_OK | X_OK) == 0 else {
                    return bad("pmem-dir=\(value): not a writable directory")
                }
                c.pmemDir = value
            case "pmem-size":
                guard let v = parseNumber(value), v > 0, v % 4096 == 0, v <= UInt64(Int.max) else {
                    return bad("pmem-size=\(value): not a positive multiple of 4096 (decimal or 0x-hex)")
                }
                c.pmemSize = v
            case "nd-root":
                guard value.hasPrefix("/") else { return bad("nd-root=\(value): not an absolute path") }
                c.ndRoot = value
            case "pmem-needs-flush":
                guard value == "0" || value == "1" else { return bad("pmem-needs-flush=\(value): not 0 or 1") }
                c.pmemNeedsFlush = value == "1"
            default:
                return bad("unknown argument '\(key)' (the kvm plugin takes \(keys.joined(separator: ", ")))")
            }
        }
        return .success(c)
    }
}

/// One load of the plugin (one npt_plugin_init): the core's table, the arguments, the host regions
/// this load offers, and its ops table (backend_data points back here). Kept for the process's life:
/// the core may use the table until its context is destroyed, and a Swift image is never unloaded.
final class KVMPlugin: @unchecked Sendable {
    let host: UnsafePointer<npt_host_api>
    let config: KVMConfig
    /// The host persistent-memory regions of this load (Pmem.swift), discovered at the first ask.
    let hostPmem = Mutex<[HostPmemRegion]?>(nil)
    private(set) var ops: UnsafeMutablePointer<npt_backend_ops>!

    private init(host: UnsafePointer<npt_host_api>, config: KVMConfig) { self.host = host; self.config = config }

    static let loads = Mutex<[KVMPlugin]>([])

    static func make(host: UnsafePointer<npt_host_api>, config: KVMConfig) -> KVMPlugin {
        let p = KVMPlugin(host: host, config: config)
        p.ops = makeOps(Unmanaged.passUnretained(p).toOpaque())
        loads.withLock { $0.append(p) }
        return p
    }

    /// The load behind `backend_data`; its host receives this thread's errors from now on.
    static func from(_ p: UnsafeMutableRawPointer?) -> KVMPlugin {
        let k = Unmanaged<KVMPlugin>.fromOpaque(p!).takeUnretainedValue()
        ckvm_set_current_host(k.host)
        return k
    }
}

/// The error channel (npt_host_api.set_error, ABI 1.3): the message goes to the host of the load
/// whose operation this thread is in (set by KVMPlugin.from, KVMVM.from, KVMVCPU.from), which makes
/// it npt_last_error() of the NPTKit call that failed.
func fail(_ s: npt_status, _ message: String) -> npt_status {
    if let raw = ckvm_current_host() {
        let host = raw.assumingMemoryBound(to: npt_host_api.self)
        if hostHas(host, \.set_error), let f = host.pointee.set_error { message.withCString { f($0) } }
    }
    return s
}
func fail(_ e: Errno, _ what: String) -> npt_status {
    fail(NPT_ERR_BACKEND, "\(what): \(e) (errno \(e.rawValue))")
}

/// The capabilities this backend advertises.
///  - RUN: it runs real x86-64 guest code in a KVM VM.
///  - MBEC_EMULATION: vcpu_set_hierarchy exposes a hierarchy as a memslot layout (Layout.swift), each
///    layout in a KVM VM of its own (a view, Views.swift): vCPUs in different hierarchies run at once.
///  - PERSISTENT_MEMORY: NVDIMM ranges backed by a file (or a real NVDIMM region), the vFHA as a
///    KVM_MEM_READONLY memslot when trapped, physical flushes as msync (Pmem.swift).
///  - PRIVILEGED_MODE: vCPUs are stopped by the kick; the region is a memslot of a view only a vCPU
///    the core put in the mode (vcpu_enter_privileged) runs in (Region.swift).
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

/// The ops table of one load (`data`: its KVMPlugin, as backend_data).
func makeOps(_ data: UnsafeMutableRawPointer) -> UnsafeMutablePointer<npt_backend_ops> {
    let p = UnsafeMutablePointer<npt_backend_ops>.allocate(capacity: 1)
    var o = npt_backend_ops()
    o.abi_version = pluginABIVersion
    o.size = UInt32(MemoryLayout<npt_backend_ops>.size)
    o.name = UnsafePointer(strdup("kvm"))
    o.description = UnsafePointer(strdup("real x86-64 guest code through /dev/kvm (hierarchies as memslot layouts); escalation exit: "
        + (escalationSupport.usable ? "yes, " : "no: ") + escalationSupport.reason))
    o.capabilities = kvmCapabilities
    o.guest_isa = UInt64(NPT_GUEST_ISA_X86_64)
    o.backend_data = data
    o.vm_create = { b, vm, config, out in KVMVM.create(plugin: KVMPlugin.from(b), handle: vm, config: config, out: out) }
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
    o.host_pmem_count = { b, count in KVMPlugin.from(b).hostPmemCount(count) }
    o.host_pmem_get = { b, index, region, targets, cap in KVMPlugin.from(b).hostPmemGet(index, region, targets, cap) }
    o.attach_pmem = { d, gpa, size, region, off, hostOff in KVMVM.from(d).attachPmem(gpa, size, region, off, hostOff) }
    o.define_flush_hint_page = { d, gpa, hostOff, trapped in KVMVM.from(d).defineFlushHintPage(gpa, hostOff, trapped != 0) }
    o.physical_flush = { d, region, controller, address in KVMVM.from(d).physicalFlush(region, controller, address) }
    o.vcpu_fence = { d in KVMVCPU.from(d).fence() }
    o.vcpu_complete_trapped_write = { d in KVMVCPU.from(d).completeTrappedWrite() }
    // KVM cannot count guest writes that do not exit (the vFHA is then an ordinary RAM page).
    o.untrapped_flush_hint_writes = { _ in 0 }
    o.power_failure = nil       // unsupported: the host cannot cut its own power
    // ABI 1.3: the privileged mode said explicitly (Region.swift), statistics (Stats.swift).
    o.vcpu_enter_privileged = { d, e in KVMVCPU.from(d).enterPrivileged(e) }
    o.vcpu_leave_privileged = { d in KVMVCPU.from(d).leavePrivileged() }
    o.vm_stats = { d, s, cap, count in KVMVM.from(d).statistics(s, cap, count) }
    o.vcpu_stats = { d, s, cap, count in KVMVCPU.from(d).statistics(s, cap, count) }
    p.initialize(to: o)
    return p
}

/// Plugin interface 2: checks the host's ABI major, parses the arguments (refusing an unknown key or
/// a bad value through set_error), and returns this load's ops table.
@_cdecl("npt_plugin_init")
public func npt_plugin_init(_ info: UnsafePointer<npt_plugin_info>?,
                            _ ops: UnsafeMutablePointer<UnsafePointer<npt_backend_ops>?>?) -> npt_status {
    guard let info, let ops else { return NPT_ERR_INVALID_ARGUMENT }
    let minimum = MemoryLayout<npt_plugin_info>.offset(of: \npt_plugin_info.args)! + MemoryLayout<UnsafeRawPointer>.size
    guard let host = info.pointee.host, Int(info.pointee.size) >= minimum else { return NPT_ERR_INVALID_ARGUMENT }
    ckvm_set_current_host(host)
    let v = info.pointee.abi_version
    guard v >> 16 == pluginABIMajor, host.pointee.abi_version >> 16 == pluginABIMajor else {
        return fail(NPT_ERR_ABI_MISMATCH,
                    "the kvm plugin is built for ABI \(pluginABIMajor).\(pluginABIMinor), the host is \(v >> 16).\(v & 0xFFFF)")
    }
    var args: [(key: String, value: String)] = []
    for i in 0..<info.pointee.argc {
        guard let a = info.pointee.args?[i], let k = a.key, let val = a.value else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "argument \(i) has a NULL key or value")
        }
        args.append((String(cString: k), String(cString: val)))
    }
    switch KVMConfig.parse(args) {
    case .failure(let e):
        return fail(e.status, e.message)
    case .success(let config):
        _ = ckvm_kick_signal_install()
        ops.pointee = UnsafePointer(KVMPlugin.make(host: host, config: config).ops)
        return NPT_OK
    }
}

/// @_cdecl does not check the export against the header: this does (a compile error if
/// npt_plugin_init's Swift signature drifts from the header's npt_plugin_init_fn).
let pluginInitMatchesHeader: npt_plugin_init_fn = npt_plugin_init
