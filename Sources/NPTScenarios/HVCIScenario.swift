import CScenarioGuests
import NPTCore

/// A guest image of the HVCI-like scenario for one guest ISA, and everything the driver needs to
/// know about it: where things are, the labelled policy, how it starts, the two attacks and the
/// attacker's writes of the entry attack, and what this image cannot do like the others (`notes`).
/// The guest follows the protocol HVCI_* of `Guests/include/scenario_protocol.h`.
package struct HVCIImage: ScenarioImage {
    package struct Attack: Sendable, Equatable {
        package var what: String
        /// The linear address the attack fetches (the fault's rip the guest kernel reports).
        package var linear: UInt64
        /// The label of the policy range it lands in.
        package var target: String
    }
    package var guest: GuestSetup
    /// The kernel's entry state (the driver adds HVCI_REG_CALLS and HVCI_REG_ATTACKS).
    package var boot: Registers
    package var guestSMEP: Bool
    /// User to driver page, then kernel to the user JIT page through its kernel alias.
    package var attacks: [Attack]
    /// The entry attack: the attacker's kernel data writes, made before the guest starts.
    package var entryAttackWrites: [MemoryWrite]
    /// How the kernel is entered at the alias, in words.
    package var entryAttackPath: String

    /// The memory with the entry attack's writes made.
    package var attackedMemory: GuestImage {
        var m = guest.memory
        for w in entryAttackWrites { m.write(w.gpa, w.bytes) }
        return m
    }
}

/// The HVCI-like MBEC scenario: a kernel whose code is supervisor-execute only, a user process whose
/// code is user-execute only making `syscalls` write system calls, then two attacks MBEC must stop:
///  1. the user process jumps to a driver page whose policy is supervisor-execute only, mapped at a
///     user-mode address;
///  2. the kernel jumps into the user's JIT page (user-execute only) through its kernel alias, a
///     supervisor-mode address (ret2dir).
/// After each reported violation the VMM injects #VE; the guest kernel's handler reports the vector
/// and the faulting rip and resumes the user process. One driver for every backend: the image is
/// chosen by the VM's guest ISA.
package struct HVCIScenario: Sendable {
    package static let name = "HVCI-like MBEC"
    /// Labels of the policy ranges (the same in every image).
    package enum Label {
        package static let kernelCode = "kernel code"
        package static let driver = "driver page (also mapped at a user-mode address)"
        package static let userCode = "user code"
        package static let userStack = "user stack"
        package static let jit = "user JIT page (also at a kernel direct-map address)"
    }

    /// The protocol's ports (HVCI_PORT_* of scenario_protocol.h).
    package enum Port {
        package static let print = UInt32(HVCI_PORT_PRINT)
        package static let pwned = UInt32(HVCI_PORT_PWNED)
        package static let faultVector = UInt32(HVCI_PORT_FAULT_VECTOR)
        package static let faultRIP = UInt32(HVCI_PORT_FAULT_RIP)
    }

    package var syscalls: Int
    /// Whether the user process makes the two attacks after its system calls.
    package var attacks: Bool
    package init(syscalls: Int = 10, attacks: Bool = true) { self.syscalls = syscalls; self.attacks = attacks }

    /// The image for guest ISA `isa`.
    package static func image(for isa: GuestISA) throws(NPTError) -> HVCIImage {
        try Scenarios.image(name, for: isa, simulator: HVCISim.image, x86_64: HVCIX86.image)
    }

    package struct Outcome: Sendable, Equatable {
        /// The write calls' arguments, as the kernel printed them.
        package var printed: [UInt64] = []
        /// The reported MBEC violations (each then injected as #VE).
        package var violations: [VMExit] = []
        /// The faults the guest kernel's handler reported: vector and rip.
        package var faultsSeenByGuest: [(vector: UInt64, rip: UInt64)] = []
        /// Payloads that ran.
        package var attacksSucceeded = 0
        package var halted = false
        package init() {}
        package static func == (a: Outcome, b: Outcome) -> Bool {
            a.printed == b.printed && a.violations == b.violations && a.attacksSucceeded == b.attacksSucceeded
                && a.halted == b.halted && a.faultsSeenByGuest.map(\.vector) == b.faultsSeenByGuest.map(\.vector)
                && a.faultsSeenByGuest.map(\.rip) == b.faultsSeenByGuest.map(\.rip)
        }
    }

    /// The entry registers of the scenario: the image's boot state with the protocol's parameters.
    package func bootRegisters(_ image: HVCIImage) -> Registers {
        var r = image.boot
        r.gpr[Int(HVCI_REG_CALLS)] = UInt64(syscalls)
        r.gpr[Int(HVCI_REG_ATTACKS)] = attacks ? 1 : 0
        return r
    }

    /// Loads the scenario into `vm` (its image chosen by the VM's guest ISA; `policy` replaces the
    /// image's) and creates vCPU `index`, its registers set.
    package func prepare(_ vm: VirtualMachine, index: UInt32 = 0, policy: [PolicyRange]? = nil) throws(NPTError) -> VirtualCPU {
        let image = try HVCIScenario.image(for: vm.guestISA)
        try Scenarios.load(vm, memory: image.memory, policy: policy ?? image.policy.ranges)
        let cpu = try vm.makeVCPU(index: index)
        try cpu.setRegisters(bootRegisters(image))
        return cpu
    }

    /// Loads the scenario into `vm` and runs it on vCPU `index` (`prepare`, then `drive`).
    package func run(on vm: VirtualMachine, index: UInt32 = 0, policy: [PolicyRange]? = nil) throws(NPTError) -> Outcome {
        try HVCIScenario.drive(try prepare(vm, index: index, policy: policy))
    }

    /// Runs a prepared vCPU with the library's loop until the guest halts; a reported violation is
    /// injected into the guest as #VE, as a VMM would.
    package static func drive(_ cpu: VirtualCPU, maxExits: Int = 1_000_000) throws(NPTError) -> Outcome {
        let index = cpu.index
        var o = Outcome()
        var vector: UInt64?
        for _ in 0..<maxExits {
            let x = try cpu.run()
            switch x.reason {
            case .io:
                switch Int32(truncatingIfNeeded: x.ioPort) {
                case HVCI_PORT_PRINT: o.printed.append(x.ioValue)
                case HVCI_PORT_FAULT_VECTOR: vector = x.ioValue
                case HVCI_PORT_FAULT_RIP:
                    o.faultsSeenByGuest.append((vector ?? .max, x.ioValue))
                    vector = nil
                case HVCI_PORT_PWNED: o.attacksSucceeded += 1
                default: throw Scenarios.unexpected(HVCIScenario.name, x, cpu: index)
                }
            case .mbecViolation:
                o.violations.append(x)
                try cpu.injectFault(vector: virtualizationExceptionVector, errorCode: x.qualification, address: x.gva.raw)
            case .halt:
                o.halted = true
                return o
            case .kicked, .budget:
                continue
            default:
                throw Scenarios.unexpected(HVCIScenario.name, x, cpu: index)
            }
        }
        throw NPTError(.state, "scenario '\(HVCIScenario.name)' did not halt within \(maxExits) exits")
    }

    /// Runs the scenario on a VM of `host` in `mode` (`policy` transforms the image's); returns the
    /// outcome and the VM's statistics.
    package func run(host: ScenarioHost, mode: VMConfig.MBECMode,
                    policy: (([PolicyRange]) -> [PolicyRange])? = nil) throws -> (Outcome, VMStatistics) {
        let image = try HVCIScenario.image(for: host.guestISA)
        return try host.withVM(image.config(mode: mode)) { vm in
            let o = try run(on: vm, policy: policy.map { $0(image.policy.ranges) })
            return (o, vm.statistics())
        }
    }
}

/// Issue 9's attack: ret2dir through the kernel's entry point. An attacker with a kernel data write
/// makes the kernel's entry for a system call land on a supervisor-mode alias of the user's JIT page
/// (user-execute only): on the simulator the PTE of the system-call entry's page, on x86-64 a new
/// PTE and IDT vector 3 (the image says which, `entryAttackWrites`). The user process then makes a
/// system call: the kernel is entered straight at the alias. Hardware MBEC refuses that fetch (a
/// supervisor-mode address needs Xs); the emulation stops it where it sees the entry (exact and lazy
/// modes: the escalation exit); violation-only mode does not (its named gap).
package struct EntryAttackScenario: Sendable {
    package static let name = "ret2dir through the kernel's entry"

    package enum Outcome: Sendable, Equatable {
        /// The kernel's first fetch at the alias was reported as an MBEC violation.
        case stopped(VMExit)
        /// The JIT page's payload ran in the kernel.
        case ran(cpl: UInt32, rip: UInt64, hierarchy: HierarchyID)
        /// The VM was refused up front: the mode needs capabilities the backend lacks.
        case refused(NPTError)
    }

    package init() {}

    /// Loads the attacked image into `vm` and runs it (one system call) on vCPU `index`.
    package func run(on vm: VirtualMachine, index: UInt32 = 0) throws(NPTError) -> Outcome {
        let image = try HVCIScenario.image(for: vm.guestISA)
        try Scenarios.load(vm, memory: image.attackedMemory, policy: image.policy.ranges)
        let cpu = try vm.makeVCPU(index: index)
        try cpu.setRegisters(HVCIScenario(syscalls: 1, attacks: false).bootRegisters(image))
        return try EntryAttackScenario.finish(cpu)
    }

    /// Runs `cpu` until the attack ran or was reported.
    package static func finish(_ cpu: VirtualCPU, maxExits: Int = 100_000) throws(NPTError) -> Outcome {
        for _ in 0..<maxExits {
            let x = try cpu.run()
            switch x.reason {
            case .mbecViolation: return .stopped(x)
            case .io where Int32(truncatingIfNeeded: x.ioPort) == HVCI_PORT_PWNED: return .ran(cpl: x.cpl, rip: x.rip, hierarchy: x.hierarchy)
            case .io, .kicked, .budget: continue
            default: throw Scenarios.unexpected(name, x, cpu: cpu.index)
            }
        }
        throw NPTError(.state, "the entry attack neither ran nor was stopped within \(maxExits) exits")
    }

    /// The attack on a VM of `host` in `mode`: refused (the VM's creation says why), stopped or ran;
    /// with the VM's statistics when it ran at all.
    package func run(host: ScenarioHost, mode: VMConfig.MBECMode) throws -> (Outcome, VMStatistics?) {
        let image = try HVCIScenario.image(for: host.guestISA)
        let vm: VirtualMachine
        do { vm = try host.makeVM(image.config(mode: mode)) } catch where error.code == .guarantee {
            return (.refused(error), nil)
        }
        defer { try? host.destroyVM(vm) }
        let o = try run(on: vm)
        return (o, vm.statistics())
    }

    /// Whether an outcome keeps `mode`'s promise: exact and lazy stop the attack (or are refused),
    /// violation-only names it as its gap (it runs, or is refused).
    package static func keepsPromise(_ o: Outcome, mode: VMConfig.MBECMode) -> Bool {
        switch (o, mode) {
        case (.refused, _): true
        case (.stopped, .exact), (.stopped, .lazy): true
        case (.ran, .violationOnly): true
        default: false
        }
    }
}
