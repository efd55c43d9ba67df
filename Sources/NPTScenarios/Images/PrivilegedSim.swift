import CScenarioGuests
import NPTCore
import NPTSimulator

/// The privileged-mode scenario's image in the simulator's ISA, protocol PRIV_* of
/// `Guests/include/scenario_protocol.h`. Paging is off: linear = guest-physical, and every address
/// is user-mode (SDM), so the user-execute bit governs the loop's fetches.
package enum PrivilegedSim {
    package static let ram: UInt64 = 4 << 20
    package static let code: UInt64 = 0x1000
    package static let heartbeats: UInt64 = 0x10000
    package static let regionBase: UInt64 = 0x8000_0000
    package static let regionSize: UInt64 = 0x10000
    /// The handler's entry count, in region memory.
    package static let countOffset: UInt64 = 0x1000
    /// The register the loop probes through (r10: the region's first bytes, or RAM).
    static let probeRegister: UInt8 = 10
    /// The probe's destination register (the VMM completes a blocked probe with all ones there).
    static let probeValue: UInt8 = 4
    package static let maxCPUs = 64

    static func loop() -> [UInt8] {
        let hb = UInt8(PRIV_REG_HEARTBEAT)
        var a = Assembler(origin: code)
        a.emit(.movi, 6, 0, PRIV_HEARTBEAT_EVERY)
        let start = a.here
        a.emit(.load, 8, hb, 0)
        a.emit(.addi, 8, 0, 1)
        a.emit(.store, hb, 8, 0)               // the heartbeat
        a.emit(.load, probeValue, probeRegister, 0) // the probe
        a.emit(.mov, 11, probeValue)
        a.emit(.addi, 11, 0, 1)                // zero iff the probe read all ones
        let noLeak = a.here + 16
        a.jz(11, to: noLeak)
        a.out(probeValue, port: PRIV_PORT_LEAK)
        a.emit(.addi, 6, 0, -1)
        a.jnz(6, to: start)
        a.emit(.movi, 6, 0, PRIV_HEARTBEAT_EVERY)
        a.out(probeValue, port: PRIV_PORT_HEARTBEAT)
        a.jmp(to: start)
        return a.bytes
    }

    static func handler(cpus: Int) -> [UInt8] {
        var a = Assembler(origin: regionBase)
        a.out(0, port: PRIV_PORT_ENTERED)      // r0: the vCPU's index
        func sum(into r: UInt8) {
            a.emit(.movi, 6, 0, Int32(heartbeats))
            a.emit(.movi, 7, 0, Int32(cpus))
            a.emit(.movi, r, 0, 0)
            let loop = a.here
            a.emit(.load, 8, 6, 0)
            a.emit(.add, r, 8)
            a.emit(.addi, 6, 0, 8)
            a.emit(.addi, 7, 0, -1)
            a.jnz(7, to: loop)
        }
        sum(into: 9)
        a.emit(.movi, 7, 0, 300)               // spin: others would move their heartbeats meanwhile
        let spin = a.here
        a.emit(.addi, 7, 0, -1)
        a.jnz(7, to: spin)
        sum(into: 11)
        a.emit(.sub, 11, 9)
        a.out(11, port: PRIV_PORT_MOVED)
        a.load64(6, regionBase + countOffset)
        a.emit(.load, 8, 6, 0)
        a.emit(.addi, 8, 0, 1)
        a.emit(.store, 6, 8, 0)
        a.out(8, port: PRIV_PORT_COUNT)
        a.emit(.rsm)
        return a.bytes + [UInt8](repeating: 0, count: Int(countOffset) + 8 - a.bytes.count)
    }

    /// The image for `cpus` vCPUs (the handler sums that many heartbeats).
    package static func image(cpus: Int) -> PrivilegedImage {
        var memory = GuestImage()
        memory.write(code, loop())
        var entry = Registers()
        entry.rip = code
        return PrivilegedImage(
            guest: GuestSetup(isa: .simulator, source: "Sources/NPTScenarios/Images/PrivilegedSim.swift (the simulator's ISA)",
                              ramSize: ram, defaultPermissions: [.read, .write], maxStepsPerRun: 2000, memory: memory,
                              policy: [LabelledRange("vCPU loop (paging off: every address is user-mode)", gpa: code, [.read, .userExecute])],
                              notes: ["A probe of the absent region is an EPT violation here; the VMM completes it with all ones."]),
            loopEntry: entry, heartbeats: heartbeats, heartbeatStride: 8, maxCPUs: maxCPUs,
            region: .init(start: regionBase, size: regionSize, contents: handler(cpus: min(max(cpus, 1), maxCPUs)), entryOffset: 0,
                          countOffset: countOffset),
            probeCompletion: (8, Int(probeValue)), probeAddressRegister: Int(probeRegister))
    }
}
