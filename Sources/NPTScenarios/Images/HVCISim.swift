import CScenarioGuests
import NPTCore
import NPTSimulator

/// The HVCI-like scenario's image in the simulator's ISA (docs/guest-isa.md), protocol HVCI_* of
/// `Guests/include/scenario_protocol.h`: a higher-half kernel, a user process, a driver page and a
/// JIT page. Every address is defined here, once.
package enum HVCISim {
    package static let ram: UInt64 = 16 << 20
    package static let kernelBase: UInt64 = 0xFFFF_8000_0000_0000

    // Guest-physical layout.
    package static let tables = GPARange(start: GPA(0), size: 0x40000)
    /// Two pages: boot and fault handler, then the system-call entry (a page of its own, so the
    /// entry attack can remap it without touching the boot code).
    package static let kernelCode: UInt64 = 0x10_0000
    package static let kernelData: UInt64 = 0x12_0000
    package static let userCode: UInt64 = 0x20_0000
    package static let userData: UInt64 = 0x22_0000
    package static let userJIT: UInt64 = 0x24_0000
    package static let driver: UInt64 = 0x30_0000

    // Guest-virtual layout.
    package static let kernelCodeVA = kernelBase + kernelCode
    package static let userCodeVA: UInt64 = 0x40_0000
    package static let userDataVA: UInt64 = 0x60_0000
    package static let userJITVA: UInt64 = 0x70_0000
    package static let driverUserAliasVA: UInt64 = 0x80_0000
    package static let jitKernelAliasVA = kernelBase + userJIT

    // Entry points.
    package static let bootVA = kernelCodeVA
    package static let faultVA = kernelCodeVA + 0x400
    package static let syscallVA = kernelCodeVA + 0x1000
    static let writeVA = syscallVA + 0x100
    static let exploitVA = syscallVA + 0x200
    static let pwnedVA = syscallVA + 0x300
    /// Where the user process goes after the system calls, and where it resumes after each attack.
    static let attacksVA = userCodeVA + 0x100
    static let after1VA = userCodeVA + 0x200
    static let after2VA = userCodeVA + 0x300

    package static let image: HVCIImage = build()

    /// The payload a successful attack runs: report HVCI_PWNED, halt.
    static func payload() -> [UInt8] {
        var a = Assembler(origin: 0)
        a.emit(.movi, 0, 0, HVCI_PWNED)
        a.out(0, port: HVCI_PORT_PWNED)
        a.emit(.hlt)
        return a.bytes
    }

    static func build() -> HVCIImage {
        var img = GuestImage()
        var pt = GuestPageTableBuilder(image: &img, tableArea: tables)
        let maps: [(UInt64, UInt64, GuestPTE)] = [
            (kernelCodeVA, kernelCode, [.present]), (syscallVA, kernelCode + 0x1000, [.present]),
            (kernelBase + kernelData, kernelData, [.present, .writable, .noExecute]),
            (jitKernelAliasVA, userJIT, [.present, .writable]),
            (userCodeVA, userCode, [.present, .user]), (userDataVA, userData, [.present, .user, .writable, .noExecute]),
            (userJITVA, userJIT, [.present, .user, .writable]), (driverUserAliasVA, driver, [.present, .user]),
        ]
        // The table area has room for every table these mappings need.
        for (va, pa, flags) in maps { try! pt.map(&img, gva: va, gpa: pa, flags: flags) }

        // Kernel: boot drops to the user process; the fault handler reports and resumes it at r9.
        var boot = Assembler(origin: bootVA)
        boot.load64(6, userCodeVA)
        boot.emit(.iret, 6)
        var fault = Assembler(origin: faultVA)
        fault.out(13, port: HVCI_PORT_FAULT_VECTOR)
        fault.out(15, port: HVCI_PORT_FAULT_RIP)
        fault.emit(.iret, UInt8(HVCI_REG_RESUME))
        // System calls: r0 = the call.
        var sys = Assembler(origin: syscallVA)
        for (number, target) in [(HVCI_SYS_WRITE, writeVA), (HVCI_SYS_EXPLOIT, exploitVA), (HVCI_SYS_PWNED, pwnedVA)] {
            sys.emit(.mov, 11, UInt8(HVCI_REG_SYSCALL))
            sys.emit(.addi, 11, 0, -number)
            sys.jz(11, to: target)
        }
        sys.emit(.hlt)                                     // HVCI_SYS_EXIT (and anything else)
        var write = Assembler(origin: writeVA)
        write.out(UInt8(HVCI_REG_ARG), port: HVCI_PORT_PRINT)
        write.emit(.sysret)
        var exploit = Assembler(origin: exploitVA)
        exploit.jump(to: jitKernelAliasVA, via: 11)        // attack 2: the kernel runs the JIT page
        var pwned = Assembler(origin: pwnedVA)
        pwned.emit(.movi, 0, 0, HVCI_PWNED)
        pwned.out(0, port: HVCI_PORT_PWNED)
        pwned.emit(.hlt)
        for a in [boot, fault, sys, write, exploit, pwned] { img.write(kernelCode + (a.origin - kernelCodeVA), a.bytes) }

        // User process: write(1) ... write(K), then (r15 != 0) the attacks, then exit.
        let arg = UInt8(HVCI_REG_ARG), sysno = UInt8(HVCI_REG_SYSCALL)
        var u = Assembler(origin: userCodeVA)
        u.emit(.movi, arg, 0, 1)
        u.emit(.mov, 5, UInt8(HVCI_REG_CALLS))
        let loop = u.here
        u.jz(5, to: attacksVA)
        u.emit(.movi, sysno, 0, HVCI_SYS_WRITE)
        u.emit(.syscall)
        u.emit(.addi, arg, 0, 1)
        u.emit(.addi, 5, 0, -1)
        u.jmp(to: loop)
        var u0 = Assembler(origin: attacksVA)
        u0.jz(UInt8(HVCI_REG_ATTACKS), to: after2VA)
        u0.load64(UInt8(HVCI_REG_RESUME), after1VA)
        u0.jump(to: driverUserAliasVA, via: 8)             // attack 1: the user process runs the driver page
        var u1 = Assembler(origin: after1VA)
        u1.load64(UInt8(HVCI_REG_RESUME), after2VA)
        u1.emit(.movi, sysno, 0, HVCI_SYS_EXPLOIT)
        u1.emit(.syscall)                                  // attack 2, inside the kernel
        var u2 = Assembler(origin: after2VA)
        u2.emit(.movi, sysno, 0, HVCI_SYS_EXIT)
        u2.emit(.syscall)
        for a in [u, u0, u1, u2] { img.write(userCode + (a.origin - userCodeVA), a.bytes) }
        img.write(driver, payload())
        img.write(userJIT, payload())

        var regs = Registers()
        regs.cr0 = Registers.cr0PG
        regs.cr3 = pt.cr3
        regs.cr4 = Registers.cr4SMEP
        regs.efer = Registers.eferNXE
        regs.rip = bootVA
        regs.lstar = syscallVA
        regs.faultHandler = faultVA

        // The entry attack: the PTE of the system-call entry's page now maps the JIT frame at that
        // supervisor-mode address (the JIT page's payload is at the entry's offset, 0).
        var table = pt.cr3
        for level in stride(from: 4, to: 1, by: -1) {
            table = img.read64(table + ((syscallVA >> (12 + 9 * UInt64(level - 1))) & 511) * 8) & 0x000F_FFFF_FFFF_F000
        }
        let pte = MemoryWrite(gpa: table + ((syscallVA >> 12) & 511) * 8, quadwords: [userJIT | GuestPTE.present.rawValue],
                              what: "the PTE of the system-call entry's page (\(hex(syscallVA))) -> the JIT frame, supervisor-mode")
        typealias L = HVCIScenario.Label
        let guest = GuestSetup(
            isa: .simulator, source: "Sources/NPTScenarios/Images/HVCISim.swift (the simulator's ISA)",
            ramSize: ram, defaultPermissions: [.read, .write], memory: img,
            policy: [LabelledRange(L.kernelCode, gpa: kernelCode, size: 0x2000, [.read, .supervisorExecute]),
                     LabelledRange(L.userCode, gpa: userCode, [.read, .userExecute]),
                     LabelledRange(L.jit, gpa: userJIT, [.read, .write, .userExecute]),
                     LabelledRange(L.driver, gpa: driver, [.read, .supervisorExecute])])
        return HVCIImage(
            guest: guest,
            boot: regs, guestSMEP: true,
            attacks: [.init(what: "user runs a supervisor-only page", linear: driverUserAliasVA, target: L.driver),
                      .init(what: "kernel runs a user page", linear: jitKernelAliasVA, target: L.jit)],
            entryAttackWrites: [pte],
            entryAttackPath: "the system-call entry (this ISA's faults use a register, not a table in memory)")
    }
}
