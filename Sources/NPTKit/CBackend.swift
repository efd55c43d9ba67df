import CNPTKit
import NPTCore
import NPTTrace
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A backend given as an `npt_backend_ops` table, by C code (`npt_backend_register`) or a plugin.
final class CBackend: Backend, @unchecked Sendable {
    let ops: npt_backend_ops
    let name: String
    let summary: String
    let capabilities: BackendCapabilities
    let guestISA: GuestISA
    let abiVersion: UInt32
    let isPlugin: Bool

    /// `ops.size` as the backend declared it: the members it covers whole are the backend's.
    let declaredSize: Int

    /// The persistent-memory operations a table needs for `NPT_CAP_PERSISTENT_MEMORY` (the others,
    /// `untrapped_flush_hint_writes` and `power_failure`, are optional).
    static let requiredPersistenceOps: [(name: String, offset: Int)] = [
        ("host_pmem_count", MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.host_pmem_count)!),
        ("host_pmem_get", MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.host_pmem_get)!),
        ("attach_pmem", MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.attach_pmem)!),
        ("define_flush_hint_page", MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.define_flush_hint_page)!),
        ("physical_flush", MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.physical_flush)!),
        ("vcpu_fence", MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.vcpu_fence)!),
        ("vcpu_complete_trapped_write", MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.vcpu_complete_trapped_write)!),
    ]

    /// Copies the caller's table (only the members its `size` covers whole, so an older, shorter
    /// table leaves the newer operations NULL: unsupported).
    init(_ p: UnsafePointer<npt_backend_ops>, isPlugin: Bool) throws(NPTError) {
        let raw = UnsafeRawPointer(p)
        let abi = raw.load(as: UInt32.self)
        guard NPTABI.major(of: abi) == NPTABI.major else {
            throw NPTError(.abiMismatch, "backend ops are for ABI \(NPTABI.major(of: abi)).\(abi & 0xFFFF), this library is \(NPTABI.major).\(NPTABI.minor)")
        }
        let size = Int(raw.load(fromByteOffset: 4, as: UInt32.self))
        let minimum = MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.vm_create)!
        guard size >= minimum else { throw .invalid("ops->size \(size) is smaller than the ops header (\(minimum))") }
        // Every member past the two version fields is pointer-sized and pointer-aligned: copying
        // only whole members keeps a `size` that ends inside one from leaving half a pointer.
        let word = MemoryLayout<UnsafeRawPointer>.size
        let copied = min(size, MemoryLayout<npt_backend_ops>.size) / word * word
        var ops = npt_backend_ops()
        withUnsafeMutableBytes(of: &ops) { $0.baseAddress!.copyMemory(from: raw, byteCount: copied) }
        guard let n = ops.name else { throw .invalid("ops->name is NULL") }
        self.ops = ops
        self.declaredSize = copied
        self.name = String(cString: n)
        self.summary = ops.description.map { String(cString: $0) } ?? ""
        // NPT_CAP_PERSISTENT_MEMORY promises host discovery, backing NVDIMM ranges, the flush hint
        // page, physical flushes, fences and completing trapped writes. A table that claims the bit
        // without every one of those operations (an older table, or a NULL) cannot keep that promise:
        // the bit is dropped, and the core then refuses NVDIMM calls on its VMs with
        // NPT_ERR_UNSUPPORTED up front instead of failing half-way through (npt_backend_get reports
        // the capabilities without the bit).
        var caps = BackendCapabilities(rawValue: ops.capabilities)
        let undefined = caps.subtracting(.defined)
        guard undefined.isEmpty else {
            throw .invalid("ops->capabilities has bits \(hex(undefined.rawValue)) that no NPT_CAP_* defines (ABI \(NPTABI.major).\(NPTABI.minor) knows \(hex(BackendCapabilities.defined.rawValue)))")
        }
        let table = ops
        let hasAll = Self.requiredPersistenceOps.allSatisfy { op in
            op.offset + word <= copied && withUnsafeBytes(of: table) { $0.load(fromByteOffset: op.offset, as: UInt.self) != 0 }
        }
        if !hasAll { caps.remove(.persistentMemory) }
        self.capabilities = caps
        let isaOffset = MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.guest_isa)!
        self.guestISA = isaOffset + word <= copied ? GuestISA(rawValue: UInt32(truncatingIfNeeded: ops.guest_isa)) ?? .unknown : .unknown
        self.abiVersion = abi
        self.isPlugin = isPlugin
    }

    func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
        guard let create = ops.vm_create else { throw .unsupported("backend '\(name)' has no vm_create") }
        // A C backend reaches the core (its hierarchies) through the host API by the VM's handle;
        // without one it could not see the policy and MBEC would silently not apply.
        guard handle != nil else {
            throw .invalid("backend '\(name)' is a C-table backend: create its VMs with npt_vm_create or NPTKitRuntime.makeVM (they need a VM handle)")
        }
        var c = npt_vm_config()
        c.size = UInt32(MemoryLayout<npt_vm_config>.size)
        c.mbec_mode = config.mbecMode.rawValue
        c.ram_size = config.ramSize
        c.default_perms = config.defaultPermissions.rawValue
        c.max_steps_per_run = config.maxStepsPerRun
        var data: UnsafeMutableRawPointer?
        let key = UInt(bitPattern: handle)
        let s = name.withCString { n in
            c.backend = n
            return Callout.around(key, "vm_create") { create(ops.backend_data, OpaquePointer(handle), &c, &data) }
        }
        try status(s, "backend '\(name)' vm_create failed")
        return CBackendVM(backend: self, data: data, handle: key)
    }

    /// Host discovery through `host_pmem_count` / `host_pmem_get`, checked: distinct region ids, at
    /// most one flush target per controller, a controller count no smaller than the targets'.
    func hostPersistence() throws(NPTError) -> HostPersistence {
        guard capabilities.contains(.persistentMemory), let countOp = ops.host_pmem_count, let getOp = ops.host_pmem_get else {
            throw .unsupported("backend '\(name)' has no persistent memory")
        }
        var count = 0
        try status(countOp(ops.backend_data, &count), "backend '\(name)' host_pmem_count")
        guard count >= 0 && count <= Self.maxHostRegions else {
            throw NPTError(.backend, "backend '\(name)' host_pmem_count reports \(count) regions (at most \(Self.maxHostRegions))")
        }
        var regions: [HostPersistence.Region] = []
        for index in 0..<count {
            var cap = 16
            var r = npt_host_pmem_region()
            var targets: [npt_flush_target] = []
            while true {
                r = npt_host_pmem_region()
                r.size = UInt32(MemoryLayout<npt_host_pmem_region>.size)
                targets = [npt_flush_target](repeating: npt_flush_target(), count: cap)
                let s = targets.withUnsafeMutableBufferPointer { getOp(ops.backend_data, index, &r, $0.baseAddress, cap) }
                try status(s, "backend '\(name)' host_pmem_get(\(index))")
                let n = Int(r.flush_target_count)
                if n <= cap { targets.removeLast(cap - n); break }
                guard n <= Self.maxFlushTargets else {
                    throw NPTError(.backend, "backend '\(name)' host_pmem_get(\(index)) reports \(n) flush targets (at most \(Self.maxFlushTargets))")
                }
                cap = n
            }
            let flushTargets = targets.map { HostPersistence.FlushTarget(controller: $0.controller, address: $0.address) }
                .sorted { $0.controller < $1.controller }
            let controllers = flushTargets.map(\.controller)
            for (i, c) in controllers.enumerated() where i > 0 && controllers[i - 1] == c {
                throw NPTError(.backend, "backend '\(name)' host_pmem_get(\(index)): region \(r.id) has two flush targets for controller \(hex(UInt64(c)))")
            }
            if Int(r.controller_count) < controllers.count {
                throw NPTError(.backend, "backend '\(name)' host_pmem_get(\(index)): region \(r.id) has \(controllers.count) flush targets on distinct controllers but controller_count \(r.controller_count)")
            }
            if regions.contains(where: { $0.id == r.id }) {
                throw NPTError(.backend, "backend '\(name)' host_pmem_get(\(index)): region id \(r.id) is reported twice")
            }
            // npt_host_pmem_region has no persistence domain: a backend that needs no WPQ flushing
            // says, in effect, that the WPQs are persistent (ADR).
            regions.append(HostPersistence.Region(id: r.id, base: r.base, size: r.length, controllers: controllers,
                                                  flushTargets: flushTargets, needsWPQFlush: r.needs_wpq_flush != 0,
                                                  domain: r.needs_wpq_flush != 0 ? .media : .memoryController))
        }
        regions.sort { $0.id < $1.id }
        return HostPersistence(regions: regions, source: "backend '\(name)'")
    }

    static let lockTurnEnd = MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.vm_lock_turn)! + MemoryLayout<UnsafeRawPointer>.size
    static let exitDecidedEnd = MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.vcpu_exit_decided)! + MemoryLayout<UnsafeRawPointer>.size
    static let maxHostRegions = 4096
    static let maxFlushTargets = 4096
}

final class CBackendVM: BackendVM, @unchecked Sendable {
    let b: CBackend
    let data: UnsafeMutableRawPointer?
    /// The VM's handle: its operations run marked as this VM's (Callout).
    let handle: UInt
    init(backend: CBackend, data: UnsafeMutableRawPointer?, handle: UInt) { b = backend; self.data = data; self.handle = handle }
    @inline(__always) func call<T>(_ op: StaticString, _ body: () -> T) -> T { Callout.around(handle, op, body) }
    private var ops: npt_backend_ops { b.ops }
    private func unsupported(_ op: String) -> NPTError { .unsupported("backend '\(b.name)' does not implement \(op)") }

    func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) {
        guard let f = ops.memory_write else { throw unsupported("memory_write") }
        try status(call("memory_write") { f(data, gpa.raw, bytes.baseAddress, bytes.count) }, "backend '\(b.name)' memory_write")
    }
    func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) {
        guard let f = ops.memory_read else { throw unsupported("memory_read") }
        try status(call("memory_read") { f(data, gpa.raw, into.baseAddress, into.count) }, "backend '\(b.name)' memory_read")
    }
    func invalidate(_ inv: Invalidation) throws(NPTError) {
        guard let f = ops.invalidate else { throw unsupported("invalidate") }
        try status(call("invalidate") { f(data, inv.hierarchy.rawValue, inv.range.start.raw, inv.range.size) }, "backend '\(b.name)' invalidate")
    }
    func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU {
        guard let f = ops.vcpu_create else { throw unsupported("vcpu_create") }
        var d: UnsafeMutableRawPointer?
        try status(call("vcpu_create") { f(data, index, &d) }, "backend '\(b.name)' vcpu_create")
        return CBackendVCPU(b: b, data: d, vm: handle)
    }
    func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError) {
        guard let f = ops.define_region else { throw unsupported("define_region") }
        try status(call("define_region") { f(data, range.start.raw, range.size, hostOffset, contents.baseAddress, contents.count) },
                   "backend '\(b.name)' define_region")
    }
    func attachPersistentMemory(_ range: GPARange, region: UInt32, regionOffset: UInt64, hostOffset: UInt64) throws(NPTError) {
        guard b.capabilities.contains(.persistentMemory), let f = ops.attach_pmem else { throw unsupported("attach_pmem") }
        try status(call("attach_pmem") { f(data, range.start.raw, range.size, region, regionOffset, hostOffset) }, "backend '\(b.name)' attach_pmem")
    }
    func defineFlushHintPage(_ gpa: GPA, hostOffset: UInt64, trapped: Bool) throws(NPTError) {
        guard b.capabilities.contains(.persistentMemory), let f = ops.define_flush_hint_page else { throw unsupported("define_flush_hint_page") }
        try status(call("define_flush_hint_page") { f(data, gpa.raw, hostOffset, trapped ? 1 : 0) }, "backend '\(b.name)' define_flush_hint_page")
    }
    func physicalFlush(region: UInt32, target: HostPersistence.FlushTarget) throws(NPTError) {
        guard b.capabilities.contains(.persistentMemory), let f = ops.physical_flush else { throw unsupported("physical_flush") }
        try status(call("physical_flush") { f(data, region, target.controller, target.address) }, "backend '\(b.name)' physical_flush")
    }
    var untrappedFlushHintWrites: UInt64 {
        guard b.capabilities.contains(.persistentMemory), let f = ops.untrapped_flush_hint_writes else { return 0 }
        return call("untrapped_flush_hint_writes") { f(data) }
    }
    func powerFailure() throws(NPTError) {
        guard b.capabilities.contains(.persistentMemory), let f = ops.power_failure else {
            throw .unsupported("backend '\(b.name)' does not model a power failure (no power_failure)")
        }
        try status(call("power_failure") { f(data) }, "backend '\(b.name)' power_failure")
    }
    func backendStatistics() throws(NPTError) -> [BackendStatistic] {
        guard let f = ops.vm_stats else { return [] }
        return try readStatistics(b.name, "vm_stats") { (p, cap, count) in call("vm_stats") { f(data, p, cap, count) } }
    }
    /// ABI 1.5, optional: a table whose size covers vm_lock_turn and sets it orders the
    /// privileged-mode coordinator's acquisitions (the trace replay backend).
    var lockTurns: LockTurnMode { b.declaredSize >= CBackend.lockTurnEnd && ops.vm_lock_turn != nil ? .replay : .none }
    func lockTurn(_ site: TraceLockSite, vcpu: UInt32?, phase: LockTurnPhase, value: UInt64) throws(NPTError) -> UInt64 {
        guard b.declaredSize >= CBackend.lockTurnEnd, let f = ops.vm_lock_turn else { return value }
        var v = phase == .taken ? value : 0
        let who = vcpu.map { Int64($0) } ?? -1
        try status(call("vm_lock_turn") { f(data, phase.rawValue, UInt32(site.rawValue), who, &v) }, "backend '\(b.name)' vm_lock_turn")
        return v
    }
    func destroy() { if let f = ops.vm_destroy { call("vm_destroy") { f(data) } } }
}

/// Asks a backend's vm_stats / vcpu_stats (room for 32, then for what it reports, at most 4096).
func readStatistics(_ backend: String, _ op: String,
                    _ call: (UnsafeMutablePointer<npt_backend_stat>?, Int, UnsafeMutablePointer<Int>) -> npt_status) throws(NPTError) -> [BackendStatistic] {
    var cap = 32
    while true {
        var count = 0
        var buf = [npt_backend_stat](repeating: npt_backend_stat(), count: cap)
        let s = buf.withUnsafeMutableBufferPointer { call($0.baseAddress, cap, &count) }
        if s == NPT_ERR_BUFFER_TOO_SMALL && count > cap && count <= 4096 {
            _ = takeBackendError()
            cap = count
            continue
        }
        if s == NPT_ERR_BUFFER_TOO_SMALL {
            // Not the caller's buffer that is too small: the core's, past its bound.
            _ = takeBackendError()
            throw NPTError(.backend, "backend '\(backend)' \(op) asks room for \(UInt(bitPattern: count)) statistics (had \(cap), at most 4096)")
        }
        try status(s, "backend '\(backend)' \(op)")
        guard count >= 0 && count <= cap else {
            throw NPTError(.backend, "backend '\(backend)' \(op) reports \(UInt(bitPattern: count)) statistics with room for \(cap)")
        }
        var out: [BackendStatistic] = []
        for st in buf.prefix(count) {
            guard let n = st.name else { throw NPTError(.backend, "backend '\(backend)' \(op): a statistic without a name") }
            out.append(BackendStatistic(name: String(cString: n), value: st.value))
        }
        return out
    }
}

final class CBackendVCPU: BackendVCPU, @unchecked Sendable {
    let b: CBackend
    let data: UnsafeMutableRawPointer?
    let vm: UInt
    init(b: CBackend, data: UnsafeMutableRawPointer?, vm: UInt) { self.b = b; self.data = data; self.vm = vm }
    @inline(__always) func call<T>(_ op: StaticString, _ body: () -> T) -> T { Callout.around(vm, op, body) }
    private var ops: npt_backend_ops { b.ops }
    private func unsupported(_ op: String) -> NPTError { .unsupported("backend '\(b.name)' does not implement \(op)") }

    func registers() throws(NPTError) -> Registers {
        guard let f = ops.vcpu_get_regs else { throw unsupported("vcpu_get_regs") }
        var r = npt_regs()
        r.size = UInt32(MemoryLayout<npt_regs>.size)
        try status(call("vcpu_get_regs") { f(data, &r) }, "backend '\(b.name)' vcpu_get_regs")
        return Registers(r)
    }
    func setRegisters(_ r: Registers) throws(NPTError) {
        guard let f = ops.vcpu_set_regs else { throw unsupported("vcpu_set_regs") }
        var c = r.c
        try status(call("vcpu_set_regs") { f(data, &c) }, "backend '\(b.name)' vcpu_set_regs")
    }
    func expose(_ h: HierarchyID) throws(NPTError) {
        guard let f = ops.vcpu_set_hierarchy else { throw unsupported("vcpu_set_hierarchy") }
        try status(call("vcpu_set_hierarchy") { f(data, h.rawValue) }, "backend '\(b.name)' vcpu_set_hierarchy")
    }
    func setExitControls(_ c: ExitControls) throws(NPTError) {
        guard let f = ops.vcpu_set_exit_controls else { throw unsupported("vcpu_set_exit_controls") }
        try status(call("vcpu_set_exit_controls") { f(data, c.rawValue) }, "backend '\(b.name)' vcpu_set_exit_controls")
    }
    func run() throws(NPTError) -> VMExit {
        guard let f = ops.vcpu_run else { throw unsupported("vcpu_run") }
        var e = npt_exit()
        e.size = UInt32(MemoryLayout<npt_exit>.size)
        try status(call("vcpu_run") { f(data, &e) }, "backend '\(b.name)' vcpu_run")
        // An exit the ABI does not define is the backend's failure, not the caller's.
        do throws(NPTError) { return try VMExit(e) } catch {
            throw NPTError(.backend, "backend '\(b.name)' vcpu_run returned an invalid exit: \(error.message)")
        }
    }
    func injectFault(vector: UInt32, errorCode: UInt64, address: UInt64) throws(NPTError) {
        guard let f = ops.vcpu_inject_fault else { throw unsupported("vcpu_inject_fault") }
        try status(call("vcpu_inject_fault") { f(data, vector, errorCode, address) }, "backend '\(b.name)' vcpu_inject_fault")
    }
    func fence() throws(NPTError) {
        guard b.capabilities.contains(.persistentMemory), let f = ops.vcpu_fence else { throw unsupported("vcpu_fence") }
        try status(call("vcpu_fence") { f(data) }, "backend '\(b.name)' vcpu_fence")
    }
    func completeTrappedWrite() throws(NPTError) {
        guard b.capabilities.contains(.persistentMemory), let f = ops.vcpu_complete_trapped_write else {
            throw unsupported("vcpu_complete_trapped_write")
        }
        try status(call("vcpu_complete_trapped_write") { f(data) }, "backend '\(b.name)' vcpu_complete_trapped_write")
    }
    func enterPrivileged(_ entry: PrivilegedEntry, interrupted: Registers) throws(NPTError) {
        // A table older than 1.3 is given the entry state as a register write.
        guard let f = ops.vcpu_enter_privileged else { return try setRegisters(entry.entryState(from: interrupted)) }
        var e = npt_privileged_entry()
        e.size = UInt32(MemoryLayout<npt_privileged_entry>.size)
        e.vcpu_index = entry.vcpuIndex
        e.region_gpa = entry.region.start.raw
        e.region_size = entry.region.size
        e.entry_rip = entry.entryRIP
        try status(call("vcpu_enter_privileged") { f(data, &e) }, "backend '\(b.name)' vcpu_enter_privileged")
    }
    func leavePrivileged() throws(NPTError) {
        guard let f = ops.vcpu_leave_privileged else { return }
        try status(call("vcpu_leave_privileged") { f(data) }, "backend '\(b.name)' vcpu_leave_privileged")
    }
    func backendStatistics() throws(NPTError) -> [BackendStatistic] {
        guard let f = ops.vcpu_stats else { return [] }
        return try readStatistics(b.name, "vcpu_stats") { (p, cap, count) in call("vcpu_stats") { f(data, p, cap, count) } }
    }
    func exitDecided(_ action: ExitAction, exit: VMExit) throws(NPTError) {
        // ABI 1.4, optional: only a table whose size covers it has it.
        guard b.declaredSize >= CBackend.exitDecidedEnd, let f = ops.vcpu_exit_decided else { return }
        var e = exit.c
        try status(call("vcpu_exit_decided") { f(data, action.rawValue, &e) }, "backend '\(b.name)' vcpu_exit_decided")
    }
    func kick() { if let f = ops.vcpu_kick { call("vcpu_kick") { f(data) } } }
    func destroy() { if let f = ops.vcpu_destroy { call("vcpu_destroy") { f(data) } } }
}

// MARK: plugins

/// The table the core hands to a plugin at load (plugins do not link libnptkit.so).
nonisolated(unsafe) let hostAPI: UnsafeMutablePointer<npt_host_api> = {
    let p = UnsafeMutablePointer<npt_host_api>.allocate(capacity: 1)
    var h = npt_host_api()
    h.abi_version = NPTABI.version
    h.size = UInt32(MemoryLayout<npt_host_api>.size)
    h.hierarchy_translate = { vm, hier, gpa, out in npt_hierarchy_translate(vm, hier, gpa, out) }
    h.hierarchy_leaves = { vm, hier, cb, ud in npt_hierarchy_leaves(vm, hier, cb, ud) }
    h.status_string = { s in npt_status_string(s) }
    // ABI 1.2
    h.host_pmem_discover_sysfs = { root, regions, rcap, rcount, targets, tcap, tcount in
        npt_host_pmem_discover_sysfs(root, regions, rcap, rcount, targets, tcap, tcount)
    }
    h.last_error = { npt_last_error() }
    // ABI 1.3
    h.set_error = { message in setBackendError(message) }
    p.initialize(to: h)
    return p
}()

/// A plugin's key/value argument (npt_plugin_arg).
package struct PluginArgument: Sendable, Equatable {
    package var key: String
    package var value: String
    package init(key: String, value: String) { self.key = key; self.value = value }
    /// "key=value" (the CLI's --backend-opt); nil without '=' or with an empty key.
    package init?(parsing text: String) {
        guard let eq = text.firstIndex(of: "="), eq != text.startIndex else { return nil }
        key = String(text[..<eq]); value = String(text[text.index(after: eq)...])
    }
}

enum PluginLoader {
    /// dlopen()s `path`, calls its entry with the host table (interface 2: and `arguments`) and
    /// returns its backend. The library is never dlclose()d, also when refused: its image may hold
    /// runtime state (a Swift image cannot be unloaded).
    static func load(_ path: String, arguments: [PluginArgument] = []) throws(NPTError) -> CBackend {
        var seen = Set<String>()
        for a in arguments {
            guard !a.key.isEmpty, !a.key.contains("=") else {
                throw .invalid("plugin argument key '\(a.key)' is empty or contains '='")
            }
            guard seen.insert(a.key).inserted else { throw .invalid("plugin argument '\(a.key)' is given twice") }
        }
        let path = resolve(path)
        guard let lib = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            let why = dlerror().map { String(cString: $0) } ?? "unknown reason"
            throw NPTError(.plugin, "cannot load '\(path)' as a plugin: \(why)")
        }
        var ops: UnsafePointer<npt_backend_ops>?
        _ = takeBackendError()
        let s: npt_status
        if let sym = dlsym(lib, NPT_PLUGIN_INIT_SYMBOL) {
            let initFn = unsafeBitCast(sym, to: npt_plugin_init_fn.self)
            s = withPluginInfo(path, arguments) { info in initFn(info, &ops) }
        } else if let sym = dlsym(lib, NPT_PLUGIN_ENTRY_SYMBOL) {
            guard arguments.isEmpty else {
                throw .invalid("plugin '\(path)' has interface 1 (\(NPT_PLUGIN_ENTRY_SYMBOL), no \(NPT_PLUGIN_INIT_SYMBOL)): it takes no arguments, got \(arguments.map(\.key).joined(separator: ", "))")
            }
            s = unsafeBitCast(sym, to: npt_plugin_entry_fn.self)(hostAPI, &ops)
        } else {
            throw NPTError(.plugin, "'\(path)' is a shared library but not an NPTKit plugin: no symbol \(NPT_PLUGIN_INIT_SYMBOL) or \(NPT_PLUGIN_ENTRY_SYMBOL)")
        }
        let detail = takeBackendError()
        if s != NPT_OK {
            let code = NPTError.Code(rawValue: s.rawValue) ?? .plugin
            throw NPTError(code, "plugin '\(path)' refused to load: \(detail ?? String(cString: npt_status_string(s)))")
        }
        guard let ops else { throw NPTError(.plugin, "plugin '\(path)' returned no ops table") }
        do throws(NPTError) {
            return try CBackend(ops, isPlugin: true)
        } catch {
            throw NPTError(error.code, "plugin '\(path)': \(error.message)")
        }
    }

    /// The directories a bare plugin name (no '/') is looked up in, in order: the installed plugin
    /// directory beside the library (LIBDIR/nptkit/plugins, what scripts/install.sh fills), the
    /// library's own directory (a build tree), and PREFIX/lib/nptkit/plugins beside an installed
    /// PREFIX/bin (the CLI, which holds the core itself). A name found in none goes to dlopen as is.
    static func pluginDirectories() -> [String] {
        guard let me = nptkit_internal_object_path(), me.pointee != 0 else { return [] }
        let file = String(cString: me)
        guard let slash = file.lastIndex(of: "/") else { return [] }
        let dir = String(file[..<slash])
        return [dir + "/nptkit/plugins", dir, dir + "/../lib/nptkit/plugins"]
    }

    static func resolve(_ name: String) -> String {
        guard !name.contains("/"), !name.isEmpty else { return name }
        for d in pluginDirectories() where access(d + "/" + name, R_OK) == 0 { return d + "/" + name }
        return name
    }

    /// An npt_plugin_info for the call: C strings that live until `body` returns.
    private static func withPluginInfo(_ path: String, _ arguments: [PluginArgument],
                                       _ body: (UnsafePointer<npt_plugin_info>) -> npt_status) -> npt_status {
        var strings: [UnsafeMutablePointer<CChar>] = []
        defer { strings.forEach { free($0) } }
        func dup(_ s: String) -> UnsafePointer<CChar> {
            let p = strdup(s)!
            strings.append(p)
            return UnsafePointer(p)
        }
        var args = arguments.map { npt_plugin_arg(key: dup($0.key), value: dup($0.value)) }
        let cpath = dup(path)
        return args.withUnsafeMutableBufferPointer { a in
            var info = npt_plugin_info()
            info.size = UInt32(MemoryLayout<npt_plugin_info>.size)
            info.abi_version = NPTABI.version
            info.host = UnsafePointer(hostAPI)
            info.path = cpath
            info.argc = a.count
            info.args = UnsafePointer(a.baseAddress)
            return body(&info)
        }
    }
}
