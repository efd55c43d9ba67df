import CNPTKit
import NPTCore
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
    let abiVersion: UInt32
    let isPlugin: Bool

    /// Copies the caller's table (only as many bytes as it declares, so an older, shorter table
    /// leaves the newer operations NULL: unsupported).
    init(_ p: UnsafePointer<npt_backend_ops>, isPlugin: Bool) throws(NPTError) {
        let raw = UnsafeRawPointer(p)
        let abi = raw.load(as: UInt32.self)
        guard NPTABI.major(of: abi) == NPTABI.major else {
            throw NPTError(.abiMismatch, "backend ops are for ABI \(NPTABI.major(of: abi)).\(abi & 0xFFFF), this library is \(NPTABI.major).\(NPTABI.minor)")
        }
        let size = Int(raw.load(fromByteOffset: 4, as: UInt32.self))
        let minimum = MemoryLayout<npt_backend_ops>.offset(of: \npt_backend_ops.vm_create)!
        guard size >= minimum else { throw .invalid("ops->size \(size) is smaller than the ops header (\(minimum))") }
        var ops = npt_backend_ops()
        withUnsafeMutableBytes(of: &ops) { $0.baseAddress!.copyMemory(from: raw, byteCount: min(size, MemoryLayout<npt_backend_ops>.size)) }
        guard let n = ops.name else { throw .invalid("ops->name is NULL") }
        self.ops = ops
        self.name = String(cString: n)
        self.summary = ops.description.map { String(cString: $0) } ?? ""
        // npt_backend_ops has no persistent-memory operations yet (host discovery, backing NVDIMM
        // ranges, the flush hint page, physical flushes, power failure), so a C backend cannot do
        // what NPT_CAP_PERSISTENT_MEMORY promises even if it claims it: the bit is dropped, and the
        // core then refuses NVDIMM calls on its VMs with NPT_ERR_UNSUPPORTED up front instead of
        // failing half-way through (npt_backend_get reports the capabilities without the bit).
        var caps = BackendCapabilities(rawValue: ops.capabilities)
        caps.remove(.persistentMemory)
        self.capabilities = caps
        self.abiVersion = abi
        self.isPlugin = isPlugin
    }

    func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
        guard let create = ops.vm_create else { throw .unsupported("backend '\(name)' has no vm_create") }
        var c = npt_vm_config()
        c.size = UInt32(MemoryLayout<npt_vm_config>.size)
        c.mbec_mode = config.mbecMode.rawValue
        c.ram_size = config.ramSize
        c.default_perms = config.defaultPermissions.rawValue
        c.max_steps_per_run = config.maxStepsPerRun
        var data: UnsafeMutableRawPointer?
        let s = name.withCString { n in
            c.backend = n
            return create(ops.backend_data, OpaquePointer(handle), &c, &data)
        }
        try status(s, "backend '\(name)' vm_create failed")
        return CBackendVM(backend: self, data: data)
    }
}

final class CBackendVM: BackendVM, @unchecked Sendable {
    let b: CBackend
    let data: UnsafeMutableRawPointer?
    init(backend: CBackend, data: UnsafeMutableRawPointer?) { b = backend; self.data = data }
    private var ops: npt_backend_ops { b.ops }
    private func unsupported(_ op: String) -> NPTError { .unsupported("backend '\(b.name)' does not implement \(op)") }

    func writeMemory(_ gpa: GPA, _ bytes: UnsafeRawBufferPointer) throws(NPTError) {
        guard let f = ops.memory_write else { throw unsupported("memory_write") }
        try status(f(data, gpa.raw, bytes.baseAddress, bytes.count), "backend '\(b.name)' memory_write")
    }
    func readMemory(_ gpa: GPA, _ into: UnsafeMutableRawBufferPointer) throws(NPTError) {
        guard let f = ops.memory_read else { throw unsupported("memory_read") }
        try status(f(data, gpa.raw, into.baseAddress, into.count), "backend '\(b.name)' memory_read")
    }
    func invalidate(_ inv: Invalidation) throws(NPTError) {
        guard let f = ops.invalidate else { throw unsupported("invalidate") }
        try status(f(data, inv.hierarchy.rawValue, inv.range.start.raw, inv.range.size), "backend '\(b.name)' invalidate")
    }
    func makeVCPU(index: UInt32) throws(NPTError) -> any BackendVCPU {
        guard let f = ops.vcpu_create else { throw unsupported("vcpu_create") }
        var d: UnsafeMutableRawPointer?
        try status(f(data, index, &d), "backend '\(b.name)' vcpu_create")
        return CBackendVCPU(b: b, data: d)
    }
    func defineRegion(_ range: GPARange, hostOffset: UInt64, contents: UnsafeRawBufferPointer) throws(NPTError) {
        guard let f = ops.define_region else { throw unsupported("define_region") }
        try status(f(data, range.start.raw, range.size, hostOffset, contents.baseAddress, contents.count),
                   "backend '\(b.name)' define_region")
    }
    func destroy() { ops.vm_destroy?(data) }
}

final class CBackendVCPU: BackendVCPU, @unchecked Sendable {
    let b: CBackend
    let data: UnsafeMutableRawPointer?
    init(b: CBackend, data: UnsafeMutableRawPointer?) { self.b = b; self.data = data }
    private var ops: npt_backend_ops { b.ops }
    private func unsupported(_ op: String) -> NPTError { .unsupported("backend '\(b.name)' does not implement \(op)") }

    func registers() throws(NPTError) -> Registers {
        guard let f = ops.vcpu_get_regs else { throw unsupported("vcpu_get_regs") }
        var r = npt_regs()
        r.size = UInt32(MemoryLayout<npt_regs>.size)
        try status(f(data, &r), "backend '\(b.name)' vcpu_get_regs")
        return Registers(r)
    }
    func setRegisters(_ r: Registers) throws(NPTError) {
        guard let f = ops.vcpu_set_regs else { throw unsupported("vcpu_set_regs") }
        var c = r.c
        try status(f(data, &c), "backend '\(b.name)' vcpu_set_regs")
    }
    func expose(_ h: HierarchyID) throws(NPTError) {
        guard let f = ops.vcpu_set_hierarchy else { throw unsupported("vcpu_set_hierarchy") }
        try status(f(data, h.rawValue), "backend '\(b.name)' vcpu_set_hierarchy")
    }
    func setExitControls(_ c: ExitControls) throws(NPTError) {
        guard let f = ops.vcpu_set_exit_controls else { throw unsupported("vcpu_set_exit_controls") }
        try status(f(data, c.rawValue), "backend '\(b.name)' vcpu_set_exit_controls")
    }
    func run() throws(NPTError) -> VMExit {
        guard let f = ops.vcpu_run else { throw unsupported("vcpu_run") }
        var e = npt_exit()
        e.size = UInt32(MemoryLayout<npt_exit>.size)
        try status(f(data, &e), "backend '\(b.name)' vcpu_run")
        return try VMExit(e)
    }
    func injectFault(vector: UInt32, errorCode: UInt64, address: UInt64) throws(NPTError) {
        guard let f = ops.vcpu_inject_fault else { throw unsupported("vcpu_inject_fault") }
        try status(f(data, vector, errorCode, address), "backend '\(b.name)' vcpu_inject_fault")
    }
    var counters: (instructions: UInt64, tlbHits: UInt64, tlbMisses: UInt64) { (0, 0, 0) }
    func kick() { ops.vcpu_kick?(data) }
    func destroy() { ops.vcpu_destroy?(data) }
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
    p.initialize(to: h)
    return p
}()

enum PluginLoader {
    /// dlopen()s `path`, calls its entry with the host table and returns its backend. The library
    /// handle stays open for the life of the process (its code may still be running).
    static func load(_ path: String) throws(NPTError) -> CBackend {
        guard let lib = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            let why = dlerror().map { String(cString: $0) } ?? "unknown reason"
            throw NPTError(.plugin, "cannot load '\(path)' as a plugin: \(why)")
        }
        guard let sym = dlsym(lib, NPT_PLUGIN_ENTRY_SYMBOL) else {
            dlclose(lib)
            throw NPTError(.plugin, "'\(path)' is a shared library but not an NPTKit plugin: no symbol \(NPT_PLUGIN_ENTRY_SYMBOL)")
        }
        let entry = unsafeBitCast(sym, to: npt_plugin_entry_fn.self)
        var ops: UnsafePointer<npt_backend_ops>?
        let s = entry(hostAPI, &ops)
        if s != NPT_OK {
            dlclose(lib)
            let code = NPTError.Code(rawValue: s.rawValue) ?? .plugin
            throw NPTError(code, "plugin '\(path)' refused to load: \(String(cString: npt_status_string(s)))")
        }
        guard let ops else {
            dlclose(lib)
            throw NPTError(.plugin, "plugin '\(path)' returned no ops table")
        }
        do throws(NPTError) {
            return try CBackend(ops, isPlugin: true)
        } catch {
            dlclose(lib)
            throw NPTError(error.code, "plugin '\(path)': \(error.message)")
        }
    }
}
