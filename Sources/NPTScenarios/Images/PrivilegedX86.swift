import CScenarioGuests
import NPTCore

/// The privileged-mode scenario's x86-64 image: `Guests/x86-64/priv.S` (16-bit real mode; its
/// addresses are its global symbols, PRIV_GUEST_*), protocol PRIV_* like the simulator's image.
package enum PrivilegedX86 {
    package static let image: PrivilegedImage = {
        var memory = GuestImage()
        memory.write(UInt64(PRIV_GUEST_BASE), Scenarios.x86Bytes("priv_guest"))
        var entry = Registers()   // real mode: cr0 = 0, CS = 0
        entry.rip = UInt64(PRIV_GUEST_BASE); entry.rflags = 2; entry.gpr[4] = 0x8000
        // Real mode (paging off): every address is user-mode, so the loop needs Xu; Xs too, for the
        // CPL-0 hierarchy the lazy mode's CPL rule would pick if the core did not know.
        let guest = GuestSetup(
            isa: .x86_64, source: "Sources/NPTScenarios/Guests/x86-64/priv.S (16-bit real mode)",
            ramSize: UInt64(PRIV_GUEST_REGION), defaultPermissions: [.read, .write], memory: memory,
            policy: [LabelledRange("vCPU loop (real mode: every address is user-mode)", gpa: UInt64(PRIV_GUEST_BASE), .all)],
            notes: ["The region is legacy SMRAM (0xA0000), entered like SMM (CS = 0xA000, real mode); a probe of it from"
                    + " outside the mode reads all ones (the backend answers a read of a GPA without memory) and never exits.",
                    "The handler sums 4 heartbeats of 4 bytes: at most 4 vCPUs."])
        return PrivilegedImage(
            guest: guest,
            loopEntry: entry, heartbeats: UInt64(PRIV_GUEST_HEARTBEATS), heartbeatStride: 4, maxCPUs: 4,
            region: .init(start: UInt64(PRIV_GUEST_REGION), size: 0x1000, contents: Scenarios.x86Bytes("priv_guest_region"),
                          entryOffset: UInt64(PRIV_GUEST_REGION_ENTRY), countOffset: UInt64(PRIV_GUEST_REGION_COUNT)),
            probeCompletion: nil, probeAddressRegister: nil)
    }()
}
