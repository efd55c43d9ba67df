import CScenarioGuests
import NPTCore

/// The NVDIMM durability scenario's x86-64 image: `Guests/x86-64/pmem.S` (its addresses are its
/// global symbols, PMEM_GUEST_*), protocol NVDIMM_* like the simulator's image.
package enum NVDIMMX86 {
    package static let image: NVDIMMImage = {
        var memory = GuestImage()
        memory.write(UInt64(PMEM_GUEST_BASE), Scenarios.x86Bytes("pmem_guest"))
        return NVDIMMImage(
            guest: GuestSetup(isa: .x86_64, source: "Sources/NPTScenarios/Guests/x86-64/pmem.S",
                              ramSize: 2 << 20, defaultPermissions: .all, memory: memory, policy: [],
                              notes: ["The write-back is CLFLUSHOPT: the instruction emulator of this machine's KVM lacks CLWB."]),
            entry: Scenarios.x86LongMode(rip: 0, cr3: UInt64(PMEM_GUEST_CR3), rsp: 0x8000),
            loopEntry: UInt64(PMEM_GUEST_CLFLUSHOPT_ENTRY), tailEntry: UInt64(PMEM_GUEST_TAIL_ENTRY),
            // pmem.S's page tables map [1 GiB, 2 GiB) (the range and the vFHA the core places after it).
            nvdimmGPA: 0x4000_0000, nvdimmSize: 2 << 20,
            writeBack: "CLFLUSHOPT")
    }()
}
