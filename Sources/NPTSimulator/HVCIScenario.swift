import NPTCore

/// A Windows-HVCI-like guest for the simulator's ISA: a kernel whose code is supervisor-execute
/// only, a user process whose code is user-execute only and which makes system calls, and two
/// attacks that MBEC must stop:
///  1. the user process jumps to a driver page whose policy is supervisor-execute only, mapped at a
///     user-mode address;
///  2. the kernel, through its direct-map alias, jumps into a user page (a ret2dir-style attack):
///     the alias is a supervisor-mode address and the page is user-execute only.
/// After a reported violation the VMM injects #VE (vector 20) and the guest kernel's fault handler
/// prints the vector and the faulting rip, then resumes the user process.
public struct HVCIScenario: Sendable {
    public static let ram: UInt64 = 16 << 20
    public static let kernelBase: UInt64 = 0xFFFF_8000_0000_0000

    // Guest-physical layout.
    public static let tables = GPARange(start: GPA(0), size: 0x40000)
    public static let kernelCode: UInt64 = 0x10_0000
    public static let kernelData: UInt64 = 0x12_0000
    public static let userCode: UInt64 = 0x20_0000
    public static let userData: UInt64 = 0x22_0000
    public static let userJIT: UInt64 = 0x24_0000
    public static let driver: UInt64 = 0x30_0000

    // Guest-virtual layout.
    public static let kernelCodeVA = kernelBase + kernelCode
    public static let userCodeVA: UInt64 = 0x40_0000
    public static let userDataVA: UInt64 = 0x60_0000
    public static let userJITVA: UInt64 = 0x70_0000
    public static let driverUserAliasVA: UInt64 = 0x80_0000
    public static let jitKernelAliasVA = kernelBase + userJIT

    // Entry points inside kernel code.
    public static let bootVA = kernelCodeVA
    public static let syscallVA = kernelCodeVA + 0x100
    public static let writeVA = kernelCodeVA + 0x200
    public static let exploitVA = kernelCodeVA + 0x300
    public static let faultVA = kernelCodeVA + 0x400

    public static let portPrint: Int32 = 1
    public static let portFaultVector: Int32 = 3
    public static let portFaultRIP: Int32 = 4
    public static let portPwned: Int32 = 9

    public let syscalls: Int
    public let smep: Bool
    public init(syscalls: Int = 10, smep: Bool = true) { self.syscalls = syscalls; self.smep = smep }

    /// The MBEC policy the VM gives (beyond the default R|W).
    public var policy: [PolicyRange] {
        func r(_ gpa: UInt64, _ p: EPTPermissions) -> PolicyRange {
            PolicyRange(start: GPA(gpa), size: 0x1000, pageSize: .size4K, permissions: p)
        }
        return [
            r(HVCIScenario.kernelCode, [.read, .supervisorExecute]),
            r(HVCIScenario.userCode, [.read, .userExecute]),
            r(HVCIScenario.userJIT, [.read, .write, .userExecute]),
            r(HVCIScenario.driver, [.read, .supervisorExecute]),
        ]
    }

    public func image() throws -> (GuestImage, Registers) {
        var img = GuestImage()
        var pt = GuestPageTableBuilder(image: &img, tableArea: HVCIScenario.tables)
        let S = HVCIScenario.self
        try pt.map(&img, gva: S.kernelCodeVA, gpa: S.kernelCode, flags: [.present])
        try pt.map(&img, gva: S.kernelBase + S.kernelData, gpa: S.kernelData, flags: [.present, .writable, .noExecute])
        try pt.map(&img, gva: S.jitKernelAliasVA, gpa: S.userJIT, flags: [.present, .writable])
        try pt.map(&img, gva: S.userCodeVA, gpa: S.userCode, flags: [.present, .user])
        try pt.map(&img, gva: S.userDataVA, gpa: S.userData, flags: [.present, .user, .writable, .noExecute])
        try pt.map(&img, gva: S.userJITVA, gpa: S.userJIT, flags: [.present, .user, .writable])
        try pt.map(&img, gva: S.driverUserAliasVA, gpa: S.driver, flags: [.present, .user])

        // Kernel: boot drops to the user process.
        var boot = Assembler(origin: S.bootVA)
        boot.load64(6, S.userCodeVA)
        boot.emit(.iret, 6)
        // System calls: r0 = number. 1 write(r10), 2 the exploit, anything else halts.
        var sys = Assembler(origin: S.syscallVA)
        sys.emit(.mov, 11, 0)
        sys.emit(.addi, 11, 0, -1)
        sys.jz(11, to: S.writeVA)
        sys.emit(.addi, 11, 0, -1)
        sys.jz(11, to: S.exploitVA)
        sys.emit(.hlt)
        var write = Assembler(origin: S.writeVA)
        write.out(10, port: S.portPrint)
        write.emit(.sysret)
        var exploit = Assembler(origin: S.exploitVA)
        exploit.jump(to: S.jitKernelAliasVA, via: 11)
        var fault = Assembler(origin: S.faultVA)
        fault.out(13, port: S.portFaultVector)
        fault.out(15, port: S.portFaultRIP)
        fault.emit(.iret, 9)
        for a in [boot, sys, write, exploit, fault] { img.write(S.kernelCode + (a.origin - S.kernelCodeVA), a.bytes) }

        // User process: `syscalls` writes, then the two attacks, then exit.
        var u = Assembler(origin: S.userCodeVA)
        u.emit(.movi, 10, 0, 0)
        u.emit(.movi, 5, 0, Int32(syscalls))
        let loop = u.here
        u.emit(.movi, 0, 0, 1)
        u.emit(.addi, 10, 0, 1)
        u.emit(.syscall)
        u.emit(.mov, 11, 10)
        u.emit(.sub, 11, 5)
        u.jnz(11, to: loop)
        let after1 = S.userCodeVA + 0x200, after2 = S.userCodeVA + 0x300
        u.load64(9, after1)
        u.jump(to: S.driverUserAliasVA, via: 8)           // attack 1
        var u1 = Assembler(origin: after1)
        u1.load64(9, after2)
        u1.emit(.movi, 0, 0, 2)
        u1.emit(.syscall)                                  // attack 2, inside the kernel
        var u2 = Assembler(origin: after2)
        u2.emit(.movi, 0, 0, 3)
        u2.emit(.syscall)                                  // exit: the kernel halts
        for a in [u, u1, u2] { img.write(S.userCode + (a.origin - S.userCodeVA), a.bytes) }

        // What a successful attack would run: print 0xBAD.
        var pwn = Assembler(origin: 0)
        pwn.emit(.movi, 0, 0, 0xBAD)
        pwn.out(0, port: S.portPwned)
        pwn.emit(.hlt)
        img.write(S.driver, pwn.bytes)
        img.write(S.userJIT, pwn.bytes)

        var regs = Registers()
        regs.cr0 = Registers.cr0PG
        regs.cr3 = pt.cr3
        regs.cr4 = smep ? Registers.cr4SMEP : 0
        regs.efer = Registers.eferNXE
        regs.cpl = 0
        regs.rip = S.bootVA
        regs.lstar = S.syscallVA
        regs.faultHandler = S.faultVA
        return (img, regs)
    }

    public struct Outcome: Sendable, Equatable {
        public var printed: [UInt64] = []
        public var violations: [VMExit] = []
        public var faultsSeenByGuest: [(vector: UInt64, rip: UInt64)] = []
        public var attacksSucceeded = 0
        public var halted = false
        public static func == (a: Outcome, b: Outcome) -> Bool {
            a.printed == b.printed && a.violations == b.violations && a.attacksSucceeded == b.attacksSucceeded
                && a.halted == b.halted && a.faultsSeenByGuest.map(\.vector) == b.faultsSeenByGuest.map(\.vector)
                && a.faultsSeenByGuest.map(\.rip) == b.faultsSeenByGuest.map(\.rip)
        }
    }

    /// What happened to the ret2dir-through-the-entry attack.
    public enum EntryAttackOutcome: Sendable, Equatable {
        /// The kernel's first fetch at the alias was reported as an MBEC violation.
        case stopped(VMExit)
        /// The user-execute-only page ran at CPL 0 (it printed 0xBAD on the pwned port).
        case ran(cpl: UInt32, rip: UInt64, hierarchy: HierarchyID)
    }

    /// The ret2dir attack through the kernel's entry point (issue 9, finding 1; on KVM it goes
    /// through an IDT gate, here through the system-call entry, this ISA's analogue). An attacker
    /// with a kernel data write makes two guest-memory writes: the PTE of the kernel page that
    /// holds the system-call entry now maps the user JIT page (user-execute only) at that
    /// supervisor-mode address, and the JIT page holds the attacker's code at the entry's offset.
    /// The user process then makes a system call: the kernel is entered straight at the alias.
    /// Hardware MBEC refuses that fetch (a supervisor-mode address needs Xs). The emulation stops
    /// it when it sees the escalation (exact and lazy modes); violation-only mode does not.
    public func runEntryAttack(on vm: VirtualMachine, index: UInt32 = 0) throws -> EntryAttackOutcome {
        let (img, regs) = try entryAttackImage()
        try vm.setPolicy(policy)
        try img.load(into: vm)
        let cpu = try vm.makeVCPU(index: index)
        try cpu.setRegisters(regs)
        return try finishEntryAttack(cpu)
    }

    /// Runs `cpu` (set up on the attack's image) until the attack ran or was reported.
    public func finishEntryAttack(_ cpu: VirtualCPU) throws -> EntryAttackOutcome {
        let S = HVCIScenario.self
        for _ in 0..<1000 {
            let x = try cpu.run()
            switch x.reason {
            case .mbecViolation: return .stopped(x)
            case .io where Int32(x.ioPort) == S.portPwned: return .ran(cpl: x.cpl, rip: x.rip, hierarchy: x.hierarchy)
            case .io: continue
            default: throw NPTError(.state, "unexpected exit in the entry attack: \(x)")
            }
        }
        throw NPTError(.state, "the entry attack neither ran nor was stopped")
    }

    /// The scenario's image after the attacker's two writes, and the user process's state (CPL 3,
    /// about to make a system call).
    public func entryAttackImage() throws -> (GuestImage, Registers) {
        var (img, regs) = try image()
        let S = HVCIScenario.self
        // The attacker's writes: the kernel-code PTE now points at the JIT frame; the JIT page holds
        // the payload at the entry's offset.
        var table = regs.cr3
        for level in stride(from: 4, to: 1, by: -1) {
            table = img.read64(table + ((S.kernelCodeVA >> (12 + 9 * UInt64(level - 1))) & 511) * 8) & 0x000F_FFFF_FFFF_F000
        }
        img.write64(table + ((S.kernelCodeVA >> 12) & 511) * 8, S.userJIT | GuestPTE.present.rawValue)
        var pwn = Assembler(origin: 0)
        pwn.emit(.movi, 0, 0, 0xBAD)
        pwn.out(0, port: S.portPwned)
        pwn.emit(.hlt)
        img.write(S.userJIT + (S.syscallVA - S.kernelCodeVA), pwn.bytes)
        // The user process runs (it booted before the attack) and makes a system call.
        regs.cpl = 3
        regs.rip = S.userCodeVA
        return (img, regs)
    }

    /// Loads the scenario into `vm` and runs it on vCPU `index` with the library's loop; a reported
    /// violation is injected into the guest as #VE, as a VMM would.
    public func run(on vm: VirtualMachine, index: UInt32 = 0, maxExits: Int = 100_000, policy: [PolicyRange]? = nil) throws -> Outcome {
        let (img, regs) = try image()
        try vm.setPolicy(policy ?? self.policy)
        try img.load(into: vm)
        let cpu = try vm.makeVCPU(index: index)
        try cpu.setRegisters(regs)
        var o = Outcome()
        var pendingVector: UInt64?
        for _ in 0..<maxExits {
            let x = try cpu.run()
            switch x.reason {
            case .io:
                switch Int32(x.ioPort) {
                case HVCIScenario.portPrint: o.printed.append(x.ioValue)
                case HVCIScenario.portFaultVector: pendingVector = x.ioValue
                case HVCIScenario.portFaultRIP: o.faultsSeenByGuest.append((pendingVector ?? 0, x.ioValue))
                case HVCIScenario.portPwned: o.attacksSucceeded += 1
                default: break
                }
            case .mbecViolation:
                o.violations.append(x)
                try cpu.injectFault(vector: Vector.virtualizationException, errorCode: x.qualification, address: x.gva.raw)
            case .halt:
                o.halted = true
                return o
            default:
                throw NPTError(.state, "unexpected exit in the HVCI scenario: \(x)")
            }
        }
        throw NPTError(.state, "the HVCI scenario did not halt within \(maxExits) exits")
    }
}
