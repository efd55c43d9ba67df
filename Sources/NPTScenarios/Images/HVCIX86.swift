import CScenarioGuests
import NPTCore

/// The HVCI-like scenario's x86-64 image: `Guests/x86-64/hvci.S` (its addresses are its global
/// symbols, HVCI_GUEST_*, defined there once), protocol HVCI_* like the simulator's image.
package enum HVCIX86 {
    static func a(_ v: UInt32) -> UInt64 { UInt64(v) }

    package static let image: HVCIImage = {
        typealias L = HVCIScenario.Label
        // The entry attack: a PTE making ALIAS_SLOT a supervisor-mode alias of the JIT page (P|W,
        // U/S = 0), and IDT vector 3 (the system call, DPL 3) pointed at it: the payload is at the
        // JIT page's offset 0.
        let slot = a(HVCI_GUEST_ALIAS_SLOT)
        let gate: [UInt64] = [(slot & 0xFFFF) | (0x10 << 16) | (0xEE << 40) | (((slot >> 16) & 0xFFFF) << 48), slot >> 32]
        var memory = GuestImage()
        memory.write(a(HVCI_GUEST_BASE), Scenarios.x86Bytes("hvci_guest"))
        let guest = GuestSetup(
            isa: .x86_64, source: "Sources/NPTScenarios/Guests/x86-64/hvci.S",
            ramSize: 2 << 20, defaultPermissions: .all, memory: memory,
            policy: [LabelledRange(L.kernelCode, gpa: a(HVCI_GUEST_CODE), [.read, .supervisorExecute]),
                     LabelledRange(L.driver, gpa: a(HVCI_GUEST_DRIVER), [.read, .supervisorExecute]),
                     LabelledRange(L.userCode, gpa: a(HVCI_GUEST_USER), [.read, .userExecute]),
                     LabelledRange(L.userStack, gpa: a(HVCI_GUEST_USTACK), [.read, .write]),
                     LabelledRange(L.jit, gpa: a(HVCI_GUEST_JIT), [.read, .write, .userExecute])],
            notes: [
                "The CPU's own structures (page tables, GDT/IDT/TSS, kernel stack) keep the default R W Xs Xu: the KVM of"
                    + " this machine cannot complete the CPU's accesses to them otherwise (Plugins/KVM/README.md).",
                "System calls are INT3 (a user-mode SYSCALL does not reach CPL 0 on this machine's KVM); the guest runs"
                    + " with CR4.SMEP off.",
            ])
        return HVCIImage(
            guest: guest,
            boot: Scenarios.x86LongMode(rip: a(HVCI_GUEST_CODE), cr3: a(HVCI_GUEST_CR3), rsp: a(HVCI_GUEST_KSTACK_TOP)),
            guestSMEP: false,
            attacks: [.init(what: "user runs a supervisor-only page", linear: a(HVCI_GUEST_DRIVER), target: L.driver),
                      .init(what: "kernel runs a user page", linear: a(HVCI_GUEST_JIT_ALIAS), target: L.jit)],
            entryAttackWrites: [
                MemoryWrite(gpa: a(HVCI_GUEST_PT) + 8 * (slot >> 12), quadwords: [a(HVCI_GUEST_JIT) | 3],
                            what: "a PTE making \(hex(slot)) a supervisor-mode alias of the JIT page \(hex(a(HVCI_GUEST_JIT)))"),
                MemoryWrite(gpa: a(HVCI_GUEST_IDT) + 3 * 16, quadwords: gate,
                            what: "IDT vector 3 (the system call) -> \(hex(slot))"),
            ],
            entryAttackPath: "IDT vector 3, the guest's system call")
    }()
}
