// The KVM backend's VM and vCPU: what the ops table's functions do.
import CKVM
import CNPTKit
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A VM of the KVM backend: guest RAM (anonymous shared memory) mapped at GPA 0 in one or more KVM
/// VMs, one per memslot layout its vCPUs need (views, Views.swift).
final class KVMVM: @unchecked Sendable {
    let system: KVMSystem
    /// The plugin load this VM was created by (its host table, its configuration).
    let plugin: KVMPlugin
    /// vm_stats (Stats.swift).
    let stats = Counters<VMStatistic>()
    let memory: GuestMemory
    /// The core's handle of this VM (for npt_host_api calls).
    let handle: OpaquePointer?
    let cpuid: KVMCPUID
    /// The KVM VM created with the VM (all RAM mapped until it adopts the first layout).
    let primary: KVMView
    /// The views and their memslot layouts (Layout.swift, Views.swift).
    let layout = Mutex(LayoutState())
    /// An NVDIMM range was attached: the views' layouts are brought up to date before the next run.
    let layoutDirty = Atomic<Bool>(false)
    /// NVDIMM ranges and the vFHA (Pmem.swift).
    let pmem = Mutex(PmemVMState())
    /// The privileged-mode region (Region.swift), and whether one was defined (checked before runs).
    let region = Mutex(RegionState())
    let regionDefined = Atomic<Bool>(false)

    private init(plugin: KVMPlugin, system: KVMSystem, primary: KVMView, memory: GuestMemory, handle: OpaquePointer?, cpuid: KVMCPUID) {
        self.plugin = plugin; self.system = system; self.primary = primary; self.memory = memory; self.handle = handle; self.cpuid = cpuid
    }

    /// The VM behind `vm_data`; its load's host receives this thread's errors from now on.
    static func from(_ p: UnsafeMutableRawPointer?) -> KVMVM {
        let v = Unmanaged<KVMVM>.fromOpaque(p!).takeUnretainedValue()
        ckvm_set_current_host(v.plugin.host)
        return v
    }

    /// The core's table of this VM's load.
    var host: UnsafePointer<npt_host_api> { plugin.host }

    static func create(plugin: KVMPlugin, handle: OpaquePointer?, config: UnsafePointer<npt_vm_config>?,
                       out: UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> npt_status {
        guard let config, let out else { return fail(NPT_ERR_INVALID_ARGUMENT, "vm_create: NULL config or out") }
        let ram = config.pointee.ram_size
        guard ram > 0, ram % 4096 == 0, ram <= UInt64(Int.max) else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "vm_create: ram_size \(ram) is not a positive multiple of 4 KiB")
        }
        let system: KVMSystem
        do {
            system = try KVMSystem()
        } catch {
            // No KVM here (ENOENT/ENODEV/ENXIO) or no permission (EACCES/EPERM): the backend cannot
            // run on this host at all.
            let unsupported: Set<Errno> = [.noSuchFileOrDirectory, Errno(rawValue: ENODEV), .noSuchAddressOrDevice,
                                           .permissionDenied, .notPermitted]
            let why = "cannot open /dev/kvm: \(error) (errno \(error.rawValue))"
            return fail(unsupported.contains(error) ? NPT_ERR_UNSUPPORTED : NPT_ERR_BACKEND, why)
        }
        do {
            let api = try system.apiVersion
            guard api == 12 else { return fail(NPT_ERR_UNSUPPORTED, "/dev/kvm speaks API \(api), not 12") }
            let cpuid = try system.supportedCPUID()
            cpuid.hideParavirtualFeatures()
            let memory = try GuestMemory(size: Int(ram))
            let primary = try KVMView(id: 0, vm: try system.createVM(), key: nil)
            try primary.vm.setUserMemoryRegion(slot: 0, flags: kvmMemLogDirty, gpa: 0, size: ram, host: memory.base)
            primary.slots[0] = MappedRange(gpa: 0, size: ram)
            let v = KVMVM(plugin: plugin, system: system, primary: primary, memory: memory, handle: handle, cpuid: cpuid)
            v.layout.withLock { $0.views = [primary] }
            out.pointee = Unmanaged.passRetained(v).toOpaque()
            return NPT_OK
        } catch {
            return fail(error, "vm_create")
        }
    }

    deinit {
        layout.withLock { st in for v in st.views { v.vm.close() } }
        system.close()
    }

    func write(_ gpa: UInt64, _ data: UnsafeRawPointer?, _ len: Int) -> npt_status {
        guard len == 0 || data != nil else { return fail(NPT_ERR_INVALID_ARGUMENT, "memory_write: NULL data") }
        // Guest RAM, or one NVDIMM range (its file mapping).
        guard withBacking(gpa, len, { if len > 0 { $0.copyMemory(from: data!, byteCount: len) } }) else {
            return fail(NPT_ERR_OUT_OF_RANGE, "memory_write: [\(hex(gpa)), +\(hex(UInt64(len)))) is outside guest RAM (\(hex(UInt64(memory.size)))) and the NVDIMM ranges")
        }
        hostWrote(gpa, len, from: nil)   // it may be a page table a view holds a shadow of
        return NPT_OK
    }

    func read(_ gpa: UInt64, _ data: UnsafeMutableRawPointer?, _ len: Int) -> npt_status {
        guard len == 0 || data != nil else { return fail(NPT_ERR_INVALID_ARGUMENT, "memory_read: NULL data") }
        guard withBacking(gpa, len, { if len > 0 { data!.copyMemory(from: $0, byteCount: len) } }) else {
            return fail(NPT_ERR_OUT_OF_RANGE, "memory_read: [\(hex(gpa)), +\(hex(UInt64(len)))) is outside guest RAM (\(hex(UInt64(memory.size)))) and the NVDIMM ranges")
        }
        return NPT_OK
    }

    func createVCPU(_ index: UInt32, _ out: UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> npt_status {
        guard let out else { return fail(NPT_ERR_INVALID_ARGUMENT, "vcpu_create: NULL out") }
        do {
            let first = try makeViewCPU(primary, index)
            let v = KVMVCPU(vm: self, first: first, index: index)
            out.pointee = Unmanaged.passRetained(v).toOpaque()
            return NPT_OK
        } catch {
            return fail(error, "vcpu_create \(index)")
        }
    }

    /// A KVM vCPU for guest vCPU `index` in view `v`, with the VM's CPUID and KVM's paravirtual
    /// features refused.
    func makeViewCPU(_ v: KVMView, _ index: UInt32) throws(Errno) -> ViewCPU {
        let cpu = try v.vm.createVCPU(id: index)
        try cpu.setCPUID(cpuid)
        try? cpu.enableCap(UInt32(KVM_CAP_ENFORCE_PV_FEATURE_CPUID), 1)
        return ViewCPU(view: v, cpu: cpu)
    }

    /// INVEPT analogue: every view's layout is recomputed from the core's leaves at once, so a
    /// revocation reaches a vCPU already inside KVM_RUN before the core's policy call returns (a
    /// memslot change is synchronous for running vCPUs, Tests/probes/kvm/probe_revoke.c; the core
    /// publishes the new hierarchies before it invalidates, and the leaves are a snapshot read
    /// that takes none of the core's locks).
    func invalidate(_ hierarchy: UInt32, _ gpa: UInt64, _ size: UInt64) -> npt_status {
        do {
            try layout.withLock { (st) throws(Errno) in
                st.cache = [:]
                try refreshViews(&st)
            }
        } catch {
            return fail(error, "invalidate: updating the views' memslot layouts")
        }
        return NPT_OK
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
