import Testing
@testable import NPTCore
import NPTTrace

/// The recorder's compact exit paths keep the order of the calls exactly: the same calls made on a
/// recorder with compact exit paths and on one without read back as the same records, whatever
/// interleaves with an exit path (another vCPU's exit path, a VMM record, calls out of the usual
/// order); only an exit path nothing interrupted becomes one exit-path record.
@Suite struct RecorderOrderTests {
    enum Call {
        case exit(UInt32, UInt64), hierarchy(UInt32, UInt32), controls(UInt32, UInt32), decision(UInt32, UInt8)
        case kick(UInt32), vmCall(UInt32)
    }

    static func record(_ calls: [Call], compact: Bool) throws -> (records: [TraceRecord], exitPaths: UInt64) {
        let sink = MemoryTraceSink()
        let recorder = try TraceRecorder(sink: sink, compactExitPaths: compact)
        var last: [UInt32: VMExit] = [:]
        for c in calls {
            switch c {
            case .exit(let v, let rip):
                var x = VMExit(reason: .io)
                x.ioPort = 0xE9; x.ioValue = rip & 0xFF; x.rip = rip
                last[v] = x
                try recorder.appendExitPath(.exit, vm: 0, vcpu: v, exit: x)
            case .hierarchy(let v, let h): try recorder.appendExitPath(.hierarchy, vm: 0, vcpu: v, value: h)
            case .controls(let v, let c): try recorder.appendExitPath(.exitControls, vm: 0, vcpu: v, value: c)
            case .decision(let v, let a): try recorder.appendExitPath(.decision, vm: 0, vcpu: v, action: a, exit: last[v] ?? VMExit(reason: .none))
            case .kick(let v): try recorder.append(.kick(vcpu: v), vm: 0)
            case .vmCall(let vm): try recorder.append(.memoryDigest(gpa: 0x1000, length: 4096, crc: 7), vm: vm)
            }
        }
        try recorder.finish()
        let reader = try TraceReader(bytes: sink.bytes)
        var out: [TraceRecord] = []
        while let e = try reader.next() {
            if case .meta = e.record { continue }
            out.append(e.record)
        }
        return (out, reader.exitPathRecords)
    }

    static func check(_ calls: [Call], exitPaths: UInt64, _ comment: Comment) throws {
        let separate = try record(calls, compact: false)
        let compact = try record(calls, compact: true)
        #expect(separate.exitPaths == 0)
        #expect(compact.records == separate.records, comment)
        #expect(compact.exitPaths == exitPaths, comment)
    }

    @Test func anExitPathNothingInterruptsIsOneRecord() throws {
        try Self.check([.exit(0, 0x1000), .hierarchy(0, 0), .controls(0, 2), .decision(0, 0),
                        .exit(0, 0x1010), .decision(0, 1),
                        .exit(0, 0x1020), .controls(0, 1), .decision(0, 0)], exitPaths: 3, "three whole exit paths")
    }

    @Test func whateverComesBetweenIsWrittenInItsPlace() throws {
        // vCPU 1's exit between vCPU 0's exit and its hierarchy; then vCPU 0's decision between
        // vCPU 1's hierarchy and its exit controls.
        try Self.check([.exit(0, 0x1000), .exit(1, 0x2000), .hierarchy(0, 0), .hierarchy(1, 1), .decision(0, 0),
                        .controls(1, 2), .decision(1, 0)], exitPaths: 0, "two vCPUs interleaved")
        // A VMM record (a kick of vCPU 0) and another VM's record inside an exit path.
        try Self.check([.exit(0, 0x1000), .hierarchy(0, 1), .kick(0), .controls(0, 1), .decision(0, 0),
                        .exit(0, 0x1004), .vmCall(1), .decision(0, 0),
                        .exit(0, 0x1008), .hierarchy(0, 0), .decision(0, 2)], exitPaths: 1, "VMM records inside exit paths")
        // Calls out of the usual order: controls before hierarchy, a second hierarchy, an exit
        // with no decision before the next exit, a decision with no exit.
        try Self.check([.exit(0, 0x1000), .controls(0, 1), .hierarchy(0, 0), .decision(0, 0),
                        .exit(0, 0x1010), .hierarchy(0, 0), .hierarchy(0, 1), .decision(0, 0),
                        .exit(0, 0x1020), .exit(0, 0x1030), .decision(0, 0),
                        .decision(1, 0), .exit(1, 0x2000)], exitPaths: 1, "calls out of order")
    }

    /// Random interleavings of four vCPUs' exit paths (some cut short) with VMM records.
    @Test func randomInterleavingsReadAsTheSeparateRecords() throws {
        var s: UInt64 = 0x5EED
        func next(_ n: UInt64) -> UInt64 {
            s &+= 0x9E37_79B9_7F4A_7C15
            var z = s
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return (z ^ (z >> 31)) % n
        }
        for round in 0..<50 {
            var calls: [Call] = []
            var step = [0, 0, 0, 0]
            for _ in 0..<200 {
                let v = Int(next(4))
                if next(10) == 0 { calls.append(next(2) == 0 ? .kick(UInt32(v)) : .vmCall(UInt32(next(2)))); continue }
                switch step[v] {
                case 0: calls.append(.exit(UInt32(v), 0x1000 * UInt64(v + 1) + next(64))); step[v] = 1
                case 1: calls.append(.hierarchy(UInt32(v), UInt32(next(2)))); step[v] = 2
                case 2: calls.append(.controls(UInt32(v), UInt32(next(4)))); step[v] = 3
                default: calls.append(.decision(UInt32(v), UInt8(next(3)))); step[v] = 0
                }
                if next(4) == 0 { step[v] = [0, 3][Int(next(2))] }
            }
            let separate = try Self.record(calls, compact: false)
            let compact = try Self.record(calls, compact: true)
            #expect(compact.records == separate.records, "round \(round)")
        }
    }
}
