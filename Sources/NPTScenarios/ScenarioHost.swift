import CScenarioGuests
import NPTCore

/// Where a scenario runs: one backend of a registry, and how VMs are made on it. Every driver of
/// this library is written against `VirtualMachine` and `VirtualCPU` only; it picks its guest image
/// by the VM's `guestISA` and never asks which backend it runs on.
///
/// A backend reached through the C ABI (a plugin) needs its VMs made with a handle
/// (`NPTKitRuntime.makeVM` / `destroyVM`): pass those; the default makes a plain `VirtualMachine`
/// (Swift backends such as the simulator).
package struct ScenarioHost: Sendable {
    package let registry: BackendRegistry
    package let backend: any Backend
    private let make: @Sendable (VMConfig, BackendRegistry) throws(NPTError) -> VirtualMachine
    private let destroy: @Sendable (VirtualMachine) throws(NPTError) -> Void

    /// `backendName` nil: the registry's default backend.
    package init(registry: BackendRegistry, backendName: String? = nil,
                makeVM: @escaping @Sendable (VMConfig, BackendRegistry) throws(NPTError) -> VirtualMachine = { c, r throws(NPTError) in
                    try VirtualMachine(config: c, registry: r)
                },
                destroyVM: @escaping @Sendable (VirtualMachine) throws(NPTError) -> Void = { vm throws(NPTError) in try vm.destroy() }) throws(NPTError) {
        self.registry = registry
        self.backend = try registry.lookup(backendName)
        self.make = makeVM
        self.destroy = destroyVM
    }

    /// The same way of making VMs, on another backend of the registry.
    package func on(_ backendName: String) throws(NPTError) -> ScenarioHost {
        try ScenarioHost(registry: registry, backendName: backendName, makeVM: make, destroyVM: destroy)
    }

    package var guestISA: GuestISA { backend.guestISA }
    package var capabilities: BackendCapabilities { backend.capabilities }
    /// The strongest MBEC mode the backend's capabilities keep.
    package var strongestMode: VMConfig.MBECMode? { VMConfig.MBECMode.strongest(for: backend.capabilities) }

    /// A VM on this host's backend (the config's backend name is set to it).
    package func makeVM(_ config: VMConfig) throws(NPTError) -> VirtualMachine {
        var c = config
        c.backendName = backend.name
        return try make(c, registry)
    }

    package func destroyVM(_ vm: VirtualMachine) throws(NPTError) { try destroy(vm) }

    /// Runs `body` on a VM made with `config`, destroyed afterwards.
    package func withVM<T>(_ config: VMConfig, _ body: (VirtualMachine) throws -> T) throws -> T {
        let vm = try makeVM(config)
        defer { try? destroyVM(vm) }
        return try body(vm)
    }
}

extension VMConfig.MBECMode {
    /// The strongest mode (exact, then lazy, then violation-only) a backend with `capabilities`
    /// keeps; nil: it cannot emulate MBEC at all.
    package static func strongest(for capabilities: BackendCapabilities) -> VMConfig.MBECMode? {
        allCases.first { $0.requiredCapabilities.isSubset(of: capabilities) }
    }
}

/// A backend as it would be without some of its capabilities (e.g. a KVM without exits on a
/// privilege change): everything is its inner backend's, except the capabilities it advertises, so
/// the core refuses the modes that need the withheld ones and arms no exit they provide. Used to
/// show what each MBEC mode needs, on any backend.
package final class WithheldCapabilities: BackendWrapper {
    package let inner: any Backend
    package var wrapped: any Backend { inner }
    package let withheld: BackendCapabilities
    package let name: String

    package init(_ inner: any Backend, withholding withheld: BackendCapabilities, name: String) {
        self.inner = inner; self.withheld = withheld; self.name = name
    }

    package var summary: String { "\(inner.summary) (without \(withheld.shortNames.joined(separator: ", ")))" }
    package var capabilities: BackendCapabilities { inner.capabilities.subtracting(withheld) }
    package var guestISA: GuestISA { inner.guestISA }
    package var abiVersion: UInt32 { inner.abiVersion }
    package var isPlugin: Bool { inner.isPlugin }
    package func makeVM(config: VMConfig, hierarchies: any HierarchyProvider, handle: UnsafeMutableRawPointer?) throws(NPTError) -> any BackendVM {
        try inner.makeVM(config: config, hierarchies: hierarchies, handle: handle)
    }
    package func hostPersistence() throws(NPTError) -> HostPersistence { try inner.hostPersistence() }
}

/// A guest-physical range of a scenario's policy and what it holds.
package struct LabelledRange: Sendable, Equatable {
    package var label: String
    package var range: PolicyRange
    package init(_ label: String, _ range: PolicyRange) { self.label = label; self.range = range }
    package init(_ label: String, gpa: UInt64, size: UInt64 = 0x1000, _ permissions: EPTPermissions) {
        self.init(label, PolicyRange(start: GPA(gpa), size: size, pageSize: .size4K, permissions: permissions))
    }
}

extension Array where Element == LabelledRange {
    /// The label of the range holding `gpa`.
    package func label(of gpa: GPA) -> String? { first { $0.range.range.contains(gpa) }?.label }
    package var ranges: [PolicyRange] { map(\.range) }
}

/// Guest memory a driver writes at a step of a scenario (an attacker's kernel data writes).
package struct MemoryWrite: Sendable, Equatable {
    package var gpa: UInt64
    package var bytes: [UInt8]
    package var what: String
    package init(gpa: UInt64, bytes: [UInt8], what: String) { self.gpa = gpa; self.bytes = bytes; self.what = what }
    package init(gpa: UInt64, quadwords: [UInt64], what: String) {
        var b: [UInt8] = []
        for q in quadwords { withUnsafeBytes(of: q.littleEndian) { b += $0 } }
        self.init(gpa: gpa, bytes: b, what: what)
    }
}

/// What every scenario image has: the guest, the VM it needs, its labelled policy.
package struct GuestSetup: Sendable {
    package var isa: GuestISA
    /// Where the guest is written.
    package var source: String
    package var ramSize: UInt64
    /// The policy of the RAM outside `policy`.
    package var defaultPermissions: EPTPermissions
    /// Step budget per run where the backend has one (0: none).
    package var maxStepsPerRun: UInt64 = 0
    package var memory: GuestImage
    package var policy: [LabelledRange]
    /// What this image does differently from the other ISA's, and why.
    package var notes: [String] = []

    /// The VM configuration the guest needs, in `mode`.
    package func config(mode: VMConfig.MBECMode) -> VMConfig {
        VMConfig(ramSize: ramSize, defaultPermissions: defaultPermissions, mbecMode: mode, maxStepsPerRun: maxStepsPerRun)
    }
}

/// A scenario's image for one guest ISA: the common part, and what the scenario's driver needs
/// besides (its members read through, `image.policy` is `image.guest.policy`).
@dynamicMemberLookup
package protocol ScenarioImage: Sendable {
    var guest: GuestSetup { get }
}

extension ScenarioImage {
    package subscript<T>(dynamicMember path: KeyPath<GuestSetup, T>) -> T { guest[keyPath: path] }
    package func config(mode: VMConfig.MBECMode) -> VMConfig { guest.config(mode: mode) }
}

enum Scenarios {
    /// A scenario's image for guest ISA `isa`: the one ISA-dependent choice of every driver.
    static func image<I: ScenarioImage>(_ scenario: String, for isa: GuestISA, simulator: @autoclosure () -> I,
                                        x86_64: @autoclosure () -> I) throws(NPTError) -> I {
        switch isa {
        case .simulator: return simulator()
        case .x86_64: return x86_64()
        default:
            throw NPTError(.unsupported, "scenario '\(scenario)' has no guest image for guest ISA \(isa) (it has images for the simulator's ISA and x86-64)")
        }
    }

    static func unexpected(_ scenario: String, _ x: VMExit, cpu: UInt32 = 0) -> NPTError {
        NPTError(.state, "scenario '\(scenario)', vCPU \(cpu): unexpected exit \(x)")
    }

    /// Loads an image's memory and policy (an empty policy leaves the VM's default everywhere).
    static func load(_ vm: VirtualMachine, memory: GuestImage, policy: [PolicyRange]) throws(NPTError) {
        if !policy.isEmpty { try vm.setPolicy(policy) }
        try memory.load(into: vm)
    }

    static func write(_ vm: VirtualMachine, _ writes: [MemoryWrite]) throws(NPTError) {
        for w in writes { try vm.writeMemory(GPA(w.gpa), bytes: w.bytes) }
    }

    static func read64(_ vm: VirtualMachine, _ gpa: UInt64) throws(NPTError) -> UInt64 {
        var v: UInt64 = 0
        try withUnsafeMutableBytes(of: &v) { b throws(NPTError) in try vm.readMemory(GPA(gpa), b) }
        return UInt64(littleEndian: v)
    }

    /// The bytes of an x86-64 guest array (CScenarioGuests).
    static func x86Bytes(_ name: String) -> [UInt8] {
        let g = scenario_x86_guest(name)
        guard let p = g.bytes else { preconditionFailure("no x86-64 guest array named \(name)") }
        return Array(UnsafeBufferPointer(start: p, count: g.length))
    }

    /// x86-64 long mode at CPL 0 as the KVM plugin sets it up from `npt_regs`
    /// (Plugins/KVM/README.md, "Conventions"): PG WP NE ET MP PE, PAE, LME|LMA.
    static func x86LongMode(rip: UInt64, cr3: UInt64, rsp: UInt64) -> Registers {
        var r = Registers()
        r.rip = rip; r.rflags = 2; r.gpr[4] = rsp
        r.cr0 = 0x8001_0033; r.cr3 = cr3; r.cr4 = 0x20; r.efer = 0x500
        return r
    }
}

/// x86's #VE: what the VMM injects after a reported MBEC violation (architectural on x86, the
/// same number on the simulator's ISA).
package let virtualizationExceptionVector: UInt32 = 20
