import CNPTKit
import NPTCore
import NPTSimulator
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The objects behind the handles.
final class ContextBox: @unchecked Sendable {

    let liveVMs = Atomic<Int>(0)
    /// Calls on the context hold a lease (npt_vm_create among them): npt_context_destroy waits for
    /// them, so no VM is created from a context that is gone.
    let life = Lifetime("the context")
    private let strings = NPTMutex<[String: UnsafeMutablePointer<CChar>]>([:])
    /// The built-in simulator, kept typed: its own configuration (npt_sim_set_platform) needs no
    /// lookup by name and no cast.
    let simulator: SimulatorBackend
    let registry: BackendRegistry
    init() { (registry, simulator) = NPTKitRuntime.makeRegistryWithSimulator() }

    /// A C string owned by the context, valid until it is destroyed.
    func cString(_ s: String) -> UnsafePointer<CChar> {
        let p: UnsafeMutablePointer<CChar> = strings.withLock { m in
            if let p = m[s] { return p }
            let p = strdup(s)!
            m[s] = p
            return p
        }
        return UnsafePointer(p)
    }
    deinit { strings.withLock { m in for p in m.values { free(p) } } }
}

final class VMBox: @unchecked Sendable {
    let vm: VirtualMachine
    let ctx: ContextBox
    let handle: OpaquePointer
    let vcpuHandles = NPTMutex<[UInt32: UInt]>([:])
    init(vm: VirtualMachine, ctx: ContextBox, handle: OpaquePointer) { self.vm = vm; self.ctx = ctx; self.handle = handle }
}

final class VCPUBox: @unchecked Sendable {
    let vcpu: VirtualCPU
    let vm: VMBox
    init(vcpu: VirtualCPU, vm: VMBox) { self.vcpu = vcpu; self.vm = vm }
}

// MARK: status and version

@c @implementation
public func npt_status_string(_ s: npt_status) -> UnsafePointer<CChar>? {
    traced(.npt_status_string, [raw(s)]) { statusText(s) }
}

private func statusText(_ s: npt_status) -> UnsafePointer<CChar> {
    let text: StaticString
    switch s {
    case NPT_OK: text = "NPT_OK: success"
    case NPT_ERR_INVALID_ARGUMENT: text = "NPT_ERR_INVALID_ARGUMENT: a NULL pointer, bad flag or bad struct size"
    case NPT_ERR_BAD_HANDLE: text = "NPT_ERR_BAD_HANDLE: the handle is destroyed or unknown"
    case NPT_ERR_MISALIGNED: text = "NPT_ERR_MISALIGNED: address or size not aligned to the page size"
    case NPT_ERR_OVERLAP: text = "NPT_ERR_OVERLAP: ranges overlap"
    case NPT_ERR_OUT_OF_RANGE: text = "NPT_ERR_OUT_OF_RANGE: address outside guest memory"
    case NPT_ERR_NOT_FOUND: text = "NPT_ERR_NOT_FOUND: no such backend or item"
    case NPT_ERR_UNSUPPORTED: text = "NPT_ERR_UNSUPPORTED: the backend cannot do this"
    case NPT_ERR_ABI_MISMATCH: text = "NPT_ERR_ABI_MISMATCH: built for another ABI major version"
    case NPT_ERR_PLUGIN: text = "NPT_ERR_PLUGIN: not a loadable NPTKit plugin"
    case NPT_ERR_BUSY: text = "NPT_ERR_BUSY: the object is in use"
    case NPT_ERR_EXISTS: text = "NPT_ERR_EXISTS: the name or index is already taken"
    case NPT_ERR_BACKEND: text = "NPT_ERR_BACKEND: the backend reported a failure"
    case NPT_ERR_BUFFER_TOO_SMALL: text = "NPT_ERR_BUFFER_TOO_SMALL: the buffer is too small"
    case NPT_ERR_STATE: text = "NPT_ERR_STATE: not valid in the current state"
    case NPT_ERR_GUARANTEE: text = "NPT_ERR_GUARANTEE: the backend cannot give what the requested mode promises"
    default: text = "NPT_ERR_UNKNOWN: not an npt_status value"
    }
    return UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
}

@c @implementation
public func npt_last_error() -> UnsafePointer<CChar>? { traced(.npt_last_error, []) { lastErrorPointer() } }

@c @implementation
public func npt_abi_version() -> UInt32 { traced(.npt_abi_version, []) { NPT_ABI_VERSION } }

// MARK: context and backends

@c @implementation
public func npt_context_create(_ out: UnsafeMutablePointer<OpaquePointer?>?) -> npt_status {
    api(.npt_context_create, [raw(out)]) { () throws(NPTError) in
        let out = try require(out, "out")
        out.pointee = Handles.make(ContextBox())
    }
}

@c @implementation
public func npt_context_destroy(_ ctx: OpaquePointer?) -> npt_status {
    api(.npt_context_destroy, [raw(ctx)]) { () throws(NPTError) in
        try Callout.refuseDestroy("npt_context_destroy")
        let c = try Handles.get(ctx, ContextBox.self, "ctx")
        try c.life.beginClose(timeoutNanos: VirtualMachine.destroyWaitNanos)
        let n = c.liveVMs.load(ordering: .acquiring)
        if n > 0 {
            c.life.cancelClose()
            throw NPTError(.busy, "\(n) VM(s) created from this context are alive; destroy them first")
        }
        c.life.finishClose()
        Handles.remove(ctx!)
    }
}

@c @implementation
public func npt_backend_count(_ ctx: OpaquePointer?, _ count: UnsafeMutablePointer<Int>?) -> npt_status {
    api(.npt_backend_count, [raw(ctx), raw(count)]) { () throws(NPTError) in
        let c = try Handles.get(ctx, ContextBox.self, "ctx")
        try require(count, "count").pointee = try c.life.withLease { () throws(NPTError) in c.registry.all.count }
    }
}

@c @implementation
public func npt_backend_get(_ ctx: OpaquePointer?, _ index: Int, _ info: UnsafeMutablePointer<npt_backend_info>?) -> npt_status {
    let index = sizeArg(index)
    return api(.npt_backend_get, [raw(ctx), raw(index), raw(info)]) { () throws(NPTError) in
        let c = try Handles.get(ctx, ContextBox.self, "ctx")
        try c.life.enter()
        defer { c.life.leave() }
        let all = c.registry.all
        guard index < UInt(all.count) else { throw NPTError(.notFound, "index \(index) is past the \(all.count) backends") }
        let b = all[Int(index)]
        var i = npt_backend_info()
        i.abi_version = b.abiVersion
        i.name = c.cString(b.name)
        i.description = c.cString(b.summary)
        i.capabilities = b.capabilities.rawValue
        i.is_default = c.registry.defaultName == b.name ? 1 : 0
        i.is_plugin = b.isPlugin ? 1 : 0
        try writeVersioned(i, info, "info")
    }
}

@c @implementation
public func npt_backend_set_default(_ ctx: OpaquePointer?, _ name: UnsafePointer<CChar>?) -> npt_status {
    api(.npt_backend_set_default, [raw(ctx), raw(name)]) { () throws(NPTError) in
        let c = try Handles.get(ctx, ContextBox.self, "ctx")
        let n = String(cString: try require(name, "name"))
        try c.life.withLease { () throws(NPTError) in try c.registry.setDefault(n) }
    }
}

@c @implementation
public func npt_mbec_mode_check(_ ctx: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ mode: UInt32,
                                _ missing: UnsafeMutablePointer<UInt64>?) -> npt_status {
    api(.npt_mbec_mode_check, [raw(ctx), raw(name), raw(mode), raw(missing)]) { () throws(NPTError) in
        let c = try Handles.get(ctx, ContextBox.self, "ctx")
        guard let m = VMConfig.MBECMode(rawValue: mode) else { throw .invalid("mode \(mode) is not an npt_mbec_mode") }
        let n = name.map { String(cString: $0) }
        let b = try c.life.withLease { () throws(NPTError) in try c.registry.lookup(n) }
        missing?.pointee = m.requiredCapabilities.subtracting(b.capabilities).rawValue
        if let refusal = m.refusal(backend: b.name, capabilities: b.capabilities, summary: b.summary) { throw refusal }
    }
}

@c @implementation
public func npt_backend_register(_ ctx: OpaquePointer?, _ ops: UnsafePointer<npt_backend_ops>?) -> npt_status {
    api(.npt_backend_register, [raw(ctx), raw(ops)]) { () throws(NPTError) in
        let c = try Handles.get(ctx, ContextBox.self, "ctx")
        let b = try CBackend(try require(ops, "ops"), isPlugin: false)
        try c.life.withLease { () throws(NPTError) in try c.registry.register(b) }
    }
}

@c @implementation
public func npt_plugin_load(_ ctx: OpaquePointer?, _ path: UnsafePointer<CChar>?, _ name: UnsafeMutablePointer<UnsafePointer<CChar>?>?) -> npt_status {
    api(.npt_plugin_load, [raw(ctx), raw(path), raw(name)]) { () throws(NPTError) in try loadPlugin(ctx, path, [], name) }
}

@c @implementation
public func npt_plugin_load_with(_ ctx: OpaquePointer?, _ path: UnsafePointer<CChar>?, _ args: UnsafePointer<npt_plugin_arg>?,
                                 _ argc: Int, _ name: UnsafeMutablePointer<UnsafePointer<CChar>?>?) -> npt_status {
    api(.npt_plugin_load_with, [raw(ctx), raw(path), raw(args), raw(argc), raw(name)]) { () throws(NPTError) in
        let n = sizeArg(argc)
        guard n <= 4096 else { throw .invalid("argc \(n) is out of range (0...4096)") }
        var arguments: [PluginArgument] = []
        if n > 0 {
            let a = try require(args, "args")
            for i in 0..<Int(n) {
                guard let k = a[i].key, let v = a[i].value else { throw .invalid("args[\(i)] has a NULL key or value") }
                arguments.append(PluginArgument(key: String(cString: k), value: String(cString: v)))
            }
        }
        try loadPlugin(ctx, path, arguments, name)
    }
}

/// Loads and registers a plugin under the context's lease (npt_context_destroy waits for it).
private func loadPlugin(_ ctx: OpaquePointer?, _ path: UnsafePointer<CChar>?, _ arguments: [PluginArgument],
                        _ name: UnsafeMutablePointer<UnsafePointer<CChar>?>?) throws(NPTError) {
    let c = try Handles.get(ctx, ContextBox.self, "ctx")
    let p = String(cString: try require(path, "path"))
    try c.life.withLease { () throws(NPTError) in
        let b = try PluginLoader.load(p, arguments: arguments)
        try c.registry.register(b)
        name?.pointee = c.cString(b.name)
    }
}

// MARK: VMs

@c @implementation
public func npt_vm_create(_ ctx: OpaquePointer?, _ config: UnsafePointer<npt_vm_config>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> npt_status {
    api(.npt_vm_create, [raw(ctx), raw(config), raw(out)]) { () throws(NPTError) in
        let c = try Handles.get(ctx, ContextBox.self, "ctx")
        let cfg = try readVersioned(config, "config")
        let out = try require(out, "out")
        guard let mode = VMConfig.MBECMode(rawValue: cfg.mbec_mode) else {
            throw .invalid("config->mbec_mode \(cfg.mbec_mode) is not an npt_mbec_mode")
        }
        var vc = VMConfig(ramSize: cfg.ram_size, defaultPermissions: EPTPermissions(rawValue: cfg.default_perms),
                          mbecMode: mode, maxStepsPerRun: cfg.max_steps_per_run,
                          backendName: cfg.backend.map { String(cString: $0) })
        // ABI 1.4: a trace of this VM alone, finished when it is destroyed. It is written under a
        // name of its own beside `record_path` and renamed to it once the VM exists: a create that
        // fails leaves no file, and an existing file at `record_path` untouched.
        var recording: (partial: String, path: String)?
        if let p = cfg.record_path {
            let path = String(cString: p)
            let partial = path + ".partial-\(getpid())-\(partialRecordings.wrappingAdd(1, ordering: .relaxed).newValue)"
            do throws(NPTError) { vc.recorder = try TraceRecorder(path: partial, finishWithVM: true) } catch {
                throw NPTError(.invalidArgument, "cannot record to '\(path)': \(error.message)")
            }
            recording = (partial, path)
        }
        do throws(NPTError) {
            // Under a lease on the context: npt_context_destroy waits for this create, then sees its VM.
            try c.life.withLease { () throws(NPTError) in
                let h = Handles.reserve()
                let vm = try VirtualMachine(config: vc, registry: c.registry, handle: UnsafeMutableRawPointer(h))
                if let r = recording, rename(r.partial, r.path) != 0 {
                    let why = String(cString: strerror(errno))
                    try? vm.destroy()
                    throw NPTError(.invalidArgument, "cannot record to '\(r.path)': \(why)")
                }
                c.liveVMs.wrappingAdd(1, ordering: .acquiringAndReleasing)
                Handles.bind(h, VMBox(vm: vm, ctx: c, handle: h))
                out.pointee = h
            }
        } catch {
            if let r = recording { unlink(r.partial) }
            throw error
        }
    }
}

/// Numbers the partial trace files of `npt_vm_create` (with the process id: unique names).
private let partialRecordings = Atomic<UInt64>(0)

@c @implementation
public func npt_vm_destroy(_ vm: OpaquePointer?) -> npt_status {
    api(.npt_vm_destroy, [raw(vm)]) { () throws(NPTError) in
        try Callout.refuseDestroy("npt_vm_destroy")
        let v = try Handles.get(vm, VMBox.self, "vm")
        try v.vm.destroy()   // all or nothing, once: a second destroy gets NPT_ERR_BAD_HANDLE here
        for h in v.vcpuHandles.withLock({ m -> [UInt] in defer { m.removeAll() }; return Array(m.values) }) {
            Handles.remove(OpaquePointer(bitPattern: h)!)
        }
        Handles.remove(vm!)
        v.ctx.liveVMs.wrappingSubtract(1, ordering: .acquiringAndReleasing)
    }
}

@c @implementation
public func npt_vm_write_memory(_ vm: OpaquePointer?, _ gpa: UInt64, _ data: UnsafeRawPointer?, _ len: Int) -> npt_status {
    let len = sizeArg(len)
    return api(.npt_vm_write_memory, [raw(vm), raw(gpa), raw(data), raw(len)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        if len == 0 { return }
        try checkLength(gpa, len)
        try v.vm.writeMemory(GPA(gpa), UnsafeRawBufferPointer(start: try require(data, "data"), count: Int(len)))
    }
}

@c @implementation
public func npt_vm_read_memory(_ vm: OpaquePointer?, _ gpa: UInt64, _ data: UnsafeMutableRawPointer?, _ len: Int) -> npt_status {
    let len = sizeArg(len)
    return api(.npt_vm_read_memory, [raw(vm), raw(gpa), raw(data), raw(len)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        if len == 0 { return }
        try checkLength(gpa, len)
        try v.vm.readMemory(GPA(gpa), UnsafeMutableRawBufferPointer(start: try require(data, "data"), count: Int(len)))
    }
}

/// A memory access's length: `size_t`, so up to 2^64 - 1; no guest memory is that large (48 bits).
private func checkLength(_ gpa: UInt64, _ len: UInt) throws(NPTError) {
    let (end, o) = gpa.addingReportingOverflow(UInt64(len))
    if o || end > PolicyTree.maxGuestPhysical {
        throw NPTError(.outOfRange, "[\(hex(gpa)), +\(hex(UInt64(len)))) is outside guest memory (len is \(len))")
    }
}

// MARK: policy

func policyRange(_ gpa: UInt64, _ size: UInt64, _ pageSize: UInt64, _ perms: UInt64, _ prefix: String) throws(NPTError) -> PolicyRange {
    guard let ps = PageSize(bytes: pageSize) else {
        throw .invalid("\(prefix)page_size \(hex(pageSize)) is not 4 KiB, 2 MiB or 1 GiB")
    }
    return PolicyRange(start: GPA(gpa), size: size, pageSize: ps, permissions: EPTPermissions(rawValue: perms))
}

@c @implementation
public func npt_policy_set(_ vm: OpaquePointer?, _ gpa: UInt64, _ size: UInt64, _ pageSize: UInt64, _ perms: UInt64) -> npt_status {
    api(.npt_policy_set, [raw(vm), raw(gpa), raw(size), raw(pageSize), raw(perms)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        try v.vm.setPolicy(try policyRange(gpa, size, pageSize, perms, ""))
    }
}

@c @implementation
public func npt_policy_set_ranges(_ vm: OpaquePointer?, _ ranges: UnsafePointer<npt_policy_range>?, _ count: Int) -> npt_status {
    let count = sizeArg(count)
    return api(.npt_policy_set_ranges, [raw(vm), raw(ranges), raw(count)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        let rs = try require(ranges, "ranges")
        guard count > 0 else { throw .invalid("count is 0") }
        guard count <= maxPolicyRanges else {
            throw .invalid("count is \(count), more than the \(maxPolicyRanges) ranges one call may apply")
        }
        var list: [PolicyRange] = []
        for i in 0..<Int(count) {
            let r = rs[i]
            list.append(try policyRange(r.gpa, r.size, r.page_size, r.perms, "ranges[\(i)]."))
        }
        do throws(NPTError) { try v.vm.setPolicy(list) } catch {
            throw NPTError(error.code, error.message + " (no range applied)")
        }
    }
}

/// Ranges one npt_policy_set_ranges call may apply.
let maxPolicyRanges: UInt = 1 << 20

@c @implementation
public func npt_policy_get(_ vm: OpaquePointer?, _ gpa: UInt64, _ perms: UnsafeMutablePointer<UInt64>?) -> npt_status {
    api(.npt_policy_get, [raw(vm), raw(gpa), raw(perms)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm", reentrant: true)
        let out = try require(perms, "perms")
        out.pointee = try v.vm.permissions(at: GPA(gpa)).rawValue
    }
}

// MARK: hierarchies

func hierarchy(_ h: UInt32) throws(NPTError) -> HierarchyID {
    guard let id = HierarchyID(rawValue: h) else {
        throw .invalid("hierarchy \(h) is not a hierarchy (0 supervisor, 1 user)")
    }
    return id
}

@c @implementation
public func npt_hierarchy_translate(_ vm: OpaquePointer?, _ h: UInt32, _ gpa: UInt64, _ out: UnsafeMutablePointer<npt_translation>?) -> npt_status {
    api(.npt_hierarchy_translate, [raw(vm), raw(h), raw(gpa), raw(out)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm", reentrant: true)
        let id = try hierarchy(h)
        guard gpa < PolicyTree.maxGuestPhysical else { throw NPTError(.outOfRange, "gpa \(hex(gpa)) is beyond 48 bits") }
        let t = v.vm.snapshot.translate(GPA(gpa), in: id)
        var r = npt_translation()
        if t.present {
            r.level = UInt32(t.level); r.page_size = t.pageSize; r.host_offset = t.hostOffset.raw
            r.perms = t.permissions.rawValue
        }
        try writeVersioned(r, out, "out")
    }
}

@c @implementation
public func npt_hierarchy_leaves(_ vm: OpaquePointer?, _ h: UInt32, _ cb: npt_leaf_cb?, _ user: UnsafeMutableRawPointer?) -> npt_status {
    api(.npt_hierarchy_leaves, [raw(vm), raw(h), raw(cb), raw(user)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm", reentrant: true)
        let id = try hierarchy(h)
        let cb = try require(cb, "cb")
        v.vm.snapshot.forEachLeaf(in: id) { gpa, size, perms in
            CallTrace.callbackCalled([gpa.raw, size, perms.rawValue])
            cb(gpa.raw, size, perms.rawValue, user)
        }
    }
}

// MARK: vCPUs

@c @implementation
public func npt_vcpu_create(_ vm: OpaquePointer?, _ index: UInt32, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> npt_status {
    api(.npt_vcpu_create, [raw(vm), raw(index), raw(out)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        let out = try require(out, "out")
        // The handle is made under the VM's lease: a racing npt_vm_destroy waits for it and then
        // destroys the vCPU with the VM (no vCPU handle outlives its VM).
        try v.vm.withLease { () throws(NPTError) in
            let cpu = try v.vm.makeVCPU(index: index)
            let h = Handles.make(VCPUBox(vcpu: cpu, vm: v))
            let bits = UInt(bitPattern: h)
            v.vcpuHandles.withLock { $0[index] = bits }
            out.pointee = h
        }
    }
}

@c @implementation
public func npt_vcpu_destroy(_ vcpu: OpaquePointer?) -> npt_status {
    api(.npt_vcpu_destroy, [raw(vcpu)]) { () throws(NPTError) in
        try Callout.refuseDestroy("npt_vcpu_destroy")
        let c = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        try c.vm.vm.removeVCPU(c.vcpu)   // all or nothing, once
        let index = c.vcpu.index
        c.vm.vcpuHandles.withLock { _ = $0.removeValue(forKey: index) }
        Handles.remove(vcpu!)
    }
}

@c @implementation
public func npt_vcpu_get_regs(_ vcpu: OpaquePointer?, _ regs: UnsafeMutablePointer<npt_regs>?) -> npt_status {
    api(.npt_vcpu_get_regs, [raw(vcpu), raw(regs)]) { () throws(NPTError) in
        let c = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        _ = try require(regs, "regs")
        try writeVersioned(try c.vcpu.registers().c, regs, "regs")
    }
}

@c @implementation
public func npt_vcpu_set_regs(_ vcpu: OpaquePointer?, _ regs: UnsafePointer<npt_regs>?) -> npt_status {
    api(.npt_vcpu_set_regs, [raw(vcpu), raw(regs)]) { () throws(NPTError) in
        let c = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        try c.vcpu.setRegisters(Registers(try readVersioned(regs, "regs")))
    }
}

@c @implementation
public func npt_vcpu_run(_ vcpu: OpaquePointer?, _ exit: UnsafeMutablePointer<npt_exit>?) -> npt_status {
    api(.npt_vcpu_run, [raw(vcpu), raw(exit)]) { () throws(NPTError) in
        let c = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        _ = try readVersioned(UnsafePointer(exit), "exit")
        try writeVersioned(try c.vcpu.run().c, exit, "exit")
    }
}

@c @implementation
public func npt_vcpu_run_raw(_ vcpu: OpaquePointer?, _ exit: UnsafeMutablePointer<npt_exit>?) -> npt_status {
    api(.npt_vcpu_run_raw, [raw(vcpu), raw(exit)]) { () throws(NPTError) in
        let c = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        _ = try readVersioned(UnsafePointer(exit), "exit")
        try writeVersioned(try c.vcpu.runRaw().c, exit, "exit")
    }
}

@c @implementation
public func npt_handle_exit(_ vcpu: OpaquePointer?, _ exit: UnsafeMutablePointer<npt_exit>?, _ action: UnsafeMutablePointer<UInt32>?) -> npt_status {
    api(.npt_handle_exit, [raw(vcpu), raw(exit), raw(action)]) { () throws(NPTError) in
        let c = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        var e = try VMExit(try readVersioned(UnsafePointer(exit), "exit"))
        let out = try require(action, "action")
        let a = try c.vcpu.handle(&e)
        try writeVersioned(e.c, exit, "exit")
        out.pointee = a.rawValue
    }
}

@c @implementation
public func npt_vcpu_inject_fault(_ vcpu: OpaquePointer?, _ vector: UInt32, _ error: UInt64, _ address: UInt64) -> npt_status {
    api(.npt_vcpu_inject_fault, [raw(vcpu), raw(vector), raw(error), raw(address)]) { () throws(NPTError) in
        let c = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        guard vector < 32 else { throw .invalid("vector \(vector) is not an exception vector (0-31)") }
        try c.vcpu.injectFault(vector: vector, errorCode: error, address: address)
    }
}

@c @implementation
public func npt_vm_get_stats(_ vm: OpaquePointer?, _ stats: UnsafeMutablePointer<npt_stats>?) -> npt_status {
    api(.npt_vm_get_stats, [raw(vm), raw(stats)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm", reentrant: true)
        _ = try require(stats, "stats")
        let s = v.vm.statistics()
        var o = npt_stats()
        o.exits_total = s.exitsTotal; o.exits_escalation = s.exitsEscalation
        o.exits_return_to_user = s.exitsReturnToUser; o.exits_ept_violation = s.exitsEPTViolation
        o.hierarchy_switches = s.hierarchySwitches; o.violations_reported = s.violationsReported
        o.policy_updates = s.policyUpdates; o.invalidations = s.invalidations
        o.instructions = s.instructions; o.tlb_hits = s.tlbHits; o.tlb_misses = s.tlbMisses
        o.shadow_nodes = s.shadowNodes; o.shadow_nodes_single = s.shadowNodesSingle
        try writeVersioned(o, stats, "stats")
    }
}

@c @implementation
public func npt_vm_guest_isa(_ vm: OpaquePointer?, _ isa: UnsafeMutablePointer<UInt32>?) -> npt_status {
    api(.npt_vm_guest_isa, [raw(vm), raw(isa)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        let out = try require(isa, "isa")
        out.pointee = v.vm.guestISA.rawValue
    }
}

@c @implementation
public func npt_vm_backend_stats(_ vm: OpaquePointer?, _ stats: UnsafeMutablePointer<npt_backend_stat>?, _ cap: Int,
                                 _ count: UnsafeMutablePointer<Int>?) -> npt_status {
    api(.npt_vm_backend_stats, [raw(vm), raw(stats), raw(cap), raw(count)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        try copyStatistics(try v.vm.backendStatistics(), stats, cap, count)
    }
}

@c @implementation
public func npt_vcpu_backend_stats(_ vcpu: OpaquePointer?, _ stats: UnsafeMutablePointer<npt_backend_stat>?, _ cap: Int,
                                   _ count: UnsafeMutablePointer<Int>?) -> npt_status {
    api(.npt_vcpu_backend_stats, [raw(vcpu), raw(stats), raw(cap), raw(count)]) { () throws(NPTError) in
        let v = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        try copyStatistics(try v.vcpu.backendStatistics(), stats, cap, count)
    }
}

// MARK: privileged mode

@c @implementation
public func npt_region_set(_ vm: OpaquePointer?, _ region: UnsafePointer<npt_region>?) -> npt_status {
    api(.npt_region_set, [raw(vm), raw(region)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        let r = try readVersioned(region, "region")
        var bytes: [UInt8] = []
        let len = sizeArg(r.contents_len)
        if len > 0 {
            guard UInt64(len) <= r.length else {
                throw .invalid("region->contents_len \(len) is larger than region->length \(hex(r.length))")
            }
            // Checked before the copy: a region's length may be anything up to 2^64 - 1, the
            // contents of one that can exist are at most 1 GiB (a fuzzer's finding: contents_len
            // 2^64 - 1 with that length trapped converting to Int).
            guard UInt64(len) <= PageSize.size1G.bytes else {
                throw NPTError(.outOfRange, "region->contents_len \(len) is larger than the largest region (1 GiB)")
            }
            guard let c = r.contents else { throw .invalid("region->contents is NULL but contents_len is \(len)") }
            bytes = Array(UnsafeRawBufferPointer(start: c, count: Int(len)))
        }
        let perms = r.perms == 0 ? EPTPermissions.all : EPTPermissions(rawValue: r.perms)
        try v.vm.defineRegion(start: GPA(r.gpa), size: r.length, contents: bytes, entryOffset: r.entry_offset, permissions: perms)
    }
}

@c @implementation
public func npt_vcpu_raise_privileged(_ vcpu: OpaquePointer?) -> npt_status {
    api(.npt_vcpu_raise_privileged, [raw(vcpu)]) { () throws(NPTError) in
        try Handles.get(vcpu, VCPUBox.self, "vcpu").vcpu.raisePrivileged()
    }
}

@c @implementation
public func npt_vcpu_raise_interrupt(_ vcpu: OpaquePointer?, _ vector: UInt32, _ deferred: UnsafeMutablePointer<Int32>?) -> npt_status {
    api(.npt_vcpu_raise_interrupt, [raw(vcpu), raw(vector), raw(deferred)]) { () throws(NPTError) in
        let c = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        guard vector < 256 else { throw .invalid("vector \(vector) is not 0-255") }
        let d = try c.vcpu.raiseInterrupt(vector: vector)
        deferred?.pointee = d ? 1 : 0
    }
}

@c @implementation
public func npt_vcpu_leave_privileged(_ vcpu: OpaquePointer?) -> npt_status {
    api(.npt_vcpu_leave_privileged, [raw(vcpu)]) { () throws(NPTError) in
        try Handles.get(vcpu, VCPUBox.self, "vcpu").vcpu.leavePrivileged()
    }
}

@c @implementation
public func npt_vm_privileged_holder(_ vm: OpaquePointer?, _ index: UnsafeMutablePointer<Int64>?) -> npt_status {
    api(.npt_vm_privileged_holder, [raw(vm), raw(index)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        try require(index, "index").pointee = v.vm.privileged.holder.map { Int64($0) } ?? -1
    }
}

@c @implementation
public func npt_vm_set_stop_timeout(_ vm: OpaquePointer?, _ ns: UInt64) -> npt_status {
    api(.npt_vm_set_stop_timeout, [raw(vm), raw(ns)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        guard ns > 0 else { throw .invalid("nanoseconds is 0") }
        v.vm.privileged.stopTimeoutNanos = ns
    }
}

@c @implementation
public func npt_vcpu_privileged_view(_ vcpu: OpaquePointer?, _ view: UnsafeMutablePointer<npt_privileged_view>?) -> npt_status {
    api(.npt_vcpu_privileged_view, [raw(vcpu), raw(view)]) { () throws(NPTError) in
        let c = try Handles.get(vcpu, VCPUBox.self, "vcpu")
        try writableVersioned(view, "view") // before the view: it is a lock turn when recorded
        let v = try c.vcpu.privilegedView()
        var o = npt_privileged_view()
        o.holder = v.holder.map { Int64($0) } ?? -1
        o.requests = v.stats.requests; o.entries = v.stats.entries; o.failures = v.stats.failures
        o.deferred_interrupts = v.stats.deferredInterrupts
        try writeVersioned(o, view, "view")
    }
}

@c @implementation
public func npt_vm_get_privileged_stats(_ vm: OpaquePointer?, _ stats: UnsafeMutablePointer<npt_privileged_stats>?) -> npt_status {
    api(.npt_vm_get_privileged_stats, [raw(vm), raw(stats)]) { () throws(NPTError) in
        let v = try Handles.get(vm, VMBox.self, "vm")
        _ = try require(stats, "stats")
        let s = v.vm.privileged.statistics
        var o = npt_privileged_stats()
        o.requests = s.requests; o.entries = s.entries; o.failures = s.failures
        o.deferred_interrupts = s.deferredInterrupts; o.entry_latency_total_ns = s.entryLatencyTotal
        o.entry_latency_max_ns = s.entryLatencyMax; o.stopped_total_ns = s.stoppedTotal
        o.outside_while_visible = (try? v.vm.backendStatistics())?.value(BackendStatistic.outsideWhileVisible) ?? 0
        try writeVersioned(o, stats, "stats")
    }
}
