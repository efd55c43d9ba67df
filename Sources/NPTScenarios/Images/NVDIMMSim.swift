import CScenarioGuests
import NPTCore
import NPTSimulator

/// The NVDIMM durability scenario's image in the simulator's ISA, protocol NVDIMM_* of
/// `Guests/include/scenario_protocol.h`. Paging is off: linear = guest-physical, and every address
/// is user-mode (SDM), so the user-execute bit governs the code's fetches.
package enum NVDIMMSim {
    package static let ram: UInt64 = 4 << 20
    package static let nvdimmGPA: UInt64 = 0x1_0000_0000
    package static let nvdimmSize: UInt64 = 2 << 20
    package static let code: UInt64 = 0x1000
    static let loopEntry = code
    static let tailEntry = code + 0x100

    /// The durable records: r3 = i, r2 = the line, r8 = the magic, r5 = records left.
    static func records(_ a: inout Assembler) {
        a.load64(8, UInt64(NVDIMM_RECORD_MAGIC))
        a.emit(.movi, 3, 0, 0)
        a.emit(.mov, 2, UInt8(NVDIMM_REG_AREA))
        a.emit(.mov, 5, UInt8(NVDIMM_REG_COUNT))
        let loop = a.here
        store(&a)
        a.emit(.clwb, 2, 0, 0)
        a.emit(.sfence)
        a.emit(.store, UInt8(NVDIMM_REG_VFHA), 3, 0)   // the flush: any value to the vFHA
        a.out(3, port: NVDIMM_PORT_DURABLE)
        next(&a)
        a.emit(.addi, 5, 0, -1)
        a.jnz(5, to: loop)
    }
    static func store(_ a: inout Assembler) {
        a.emit(.store, 2, 8, 0)
        a.emit(.store, 2, 3, 8)
    }
    static func next(_ a: inout Assembler) {
        a.emit(.addi, 3, 0, 1)
        a.emit(.addi, 2, 0, NVDIMM_RECORD_STRIDE)
    }

    package static let image: NVDIMMImage = {
        var plain = Assembler(origin: loopEntry)
        records(&plain)
        plain.emit(.hlt)
        var t = Assembler(origin: tailEntry)
        records(&t)
        store(&t)                                      // record N: stored only
        t.out(3, port: NVDIMM_PORT_STORED_ONLY)
        next(&t)
        store(&t)                                      // record N + 1: written back and fenced, not flushed
        t.emit(.clwb, 2, 0, 0)
        t.emit(.sfence)
        t.out(3, port: NVDIMM_PORT_FENCED_ONLY)
        t.emit(.hlt)
        var memory = GuestImage()
        memory.write(loopEntry, plain.bytes)
        memory.write(tailEntry, t.bytes)
        return NVDIMMImage(
            guest: GuestSetup(isa: .simulator, source: "Sources/NPTScenarios/Images/NVDIMMSim.swift (the simulator's ISA)",
                              ramSize: ram, defaultPermissions: [.read, .write], memory: memory,
                              policy: [LabelledRange("code (paging off: every address is user-mode)", gpa: code, [.read, .userExecute])]),
            entry: Registers(), loopEntry: loopEntry, tailEntry: tailEntry, nvdimmGPA: nvdimmGPA, nvdimmSize: nvdimmSize,
            writeBack: "CLWB")
    }()
}
