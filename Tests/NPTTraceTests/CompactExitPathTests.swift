import Testing
@testable import NPTTrace

/// The exit-path record (1.3, header flag `compactExitPaths`): one record for a vCPU's exit, the
/// hierarchy and exit controls set while it was handled, and the decision. The reference is the
/// same calls written as separate records (the form every earlier version has): a reader must
/// return exactly those records, with the same numbers and timestamps.
@Suite struct CompactExitPathTests {
    /// `n` random exit paths (every combination of parts, a decision on the exit itself or on a
    /// rewritten one, four vCPUs, timestamps that repeat or jump) between random records of every
    /// other kind, written both ways.
    static func bothWays(seed: UInt64, n: Int) throws -> (separate: [UInt8], compact: [UInt8], combinations: Int) {
        var r = Rng(s: seed)
        let sep = MemoryTraceSink(), cmp = MemoryTraceSink()
        let ws = try TraceWriter(sink: sep, blockPayload: 512)
        let wc = try TraceWriter(sink: cmp, blockPayload: 512, flags: TraceFormat.compactExitPaths)
        var t: UInt64 = 1_000
        var last = TraceExit(reason: .io, ioPort: 0xE9, rip: 0x40_0000)
        var combinations = Set<Int>()
        for _ in 0..<n {
            t += r.below(3) == 0 ? 0 : r.below(10_000)
            if r.below(4) == 0 {
                let rec = randomRecord(&r)
                try ws.append(rec, at: t)
                try wc.append(rec, at: t)
                continue
            }
            let v = UInt32(r.below(4))
            // Mostly exits close to the last one (what a guest makes), sometimes anything.
            var exit = last
            if r.below(5) == 0 { exit = randomExit(&r) } else { exit.rip &+= r.below(64); exit.ioValue = r.below(300) }
            last = exit
            let h: UInt32? = r.below(2) == 0 ? UInt32(r.below(2)) : nil
            let c: UInt32? = r.below(2) == 0 ? UInt32(r.below(4)) : nil
            var decided = exit
            if r.below(4) == 0 { decided.reason = .mbecViolation; decided.qualification = r.value() }
            let action = UInt8(r.below(3))
            combinations.insert((h == nil ? 0 : 1) | (c == nil ? 0 : 2) | (decided == exit ? 0 : 4))
            try ws.appendExitPath(.exit, vcpu: v, exit: exit, at: t)
            if let h { try ws.appendExitPath(.hierarchy, vcpu: v, value: h, exit: TraceExit(), at: t) }
            if let c { try ws.appendExitPath(.exitControls, vcpu: v, value: c, exit: TraceExit(), at: t) }
            try ws.appendExitPath(.decision, vcpu: v, action: action, exit: decided, at: t)
            try wc.appendExitPath(vcpu: v, exit: exit, hierarchy: h, exitControls: c, action: action,
                                  decision: decided == exit ? nil : decided, at: t)
        }
        try ws.finish()
        try wc.finish()
        #expect(ws.recordCount == wc.recordCount)
        return (sep.bytes, cmp.bytes, combinations.count)
    }

    @Test func compactExitPathsReadAsTheSeparateRecords() throws {
        let (sep, cmp, combinations) = try Self.bothWays(seed: 0x27, n: 4000)
        #expect(combinations == 8, "every combination of parts is written")
        let a = try readAll(sep), b = try readAll(cmp)
        #expect(a.count == b.count)
        #expect(a.map(\.record) == b.map(\.record))
        #expect(a.map(\.index) == b.map(\.index) && b.map(\.index) == (0..<UInt64(b.count)).map { $0 })
        #expect(a.map(\.timestamp) == b.map(\.timestamp))
        // Smaller: one frame and one vCPU number for up to four records, the decision's exit not repeated.
        #expect(cmp.count * 10 < sep.count * 8, "\(cmp.count) bytes compact, \(sep.count) separate")
        let reader = try TraceReader(bytes: cmp)
        while try reader.next() != nil {}
        #expect(reader.flags == TraceFormat.compactExitPaths && reader.exitPathRecords > 2000)
        let plain = try TraceReader(bytes: sep)
        while try plain.next() != nil {}
        #expect(plain.flags == 0 && plain.exitPathRecords == 0)
    }

    /// Where an exit-path record is, the records before it are returned, then the error at its
    /// byte offset, again on every later call.
    static func expectRefused(_ bytes: [UInt8], at offset: UInt64, _ text: String) throws {
        let r = try TraceReader(bytes: bytes)
        var got = 0
        do {
            while try r.next() != nil { got += 1 }
            Issue.record("read to the end, \(got) records")
        } catch {
            #expect(error.kind == .invalidRecord && error.offset == offset, "\(error)")
            #expect("\(error)".contains(text), "\(error)")
            do { _ = try r.next(); Issue.record("not sticky") } catch { #expect(error.offset == offset) }
        }
    }

    /// A trace whose first block's first record is one exit path (vCPU 1, hierarchy 0, controls 2).
    static func oneExitPath() throws -> [UInt8] {
        let sink = MemoryTraceSink()
        let w = try TraceWriter(sink: sink, flags: TraceFormat.compactExitPaths)
        let x = TraceExit(reason: .escalation, cpl: 0, hierarchy: 1, rip: 0xffff_8000_0010_1000)
        try w.appendExitPath(vcpu: 1, exit: x, hierarchy: 0, exitControls: 2, action: 0, decision: nil, at: 5)
        try w.append(.meta(key: "after", value: "it"), at: 6)
        try w.finish()
        return sink.bytes
    }

    @Test func badExitPathsAreRefusedWithTheirOffset() throws {
        let good = try Self.oneExitPath()
        let record = TraceFormat.headerSize + TraceFormat.blockHeaderSize
        #expect(good[record] == RecordKind.exitPath && good[record + 3] == 1, "layout: kind, delta, length, vCPU, parts")
        #expect(try readAll(good).map(\.record).prefix(4) == [
            .exit(vcpu: 1, TraceExit(reason: .escalation, cpl: 0, hierarchy: 1, rip: 0xffff_8000_0010_1000)),
            .hierarchy(vcpu: 1, hierarchy: 0), .exitControls(vcpu: 1, controls: 2),
            .decision(vcpu: 1, action: .resume, exit: TraceExit(reason: .escalation, cpl: 0, hierarchy: 1, rip: 0xffff_8000_0010_1000))])

        // Without the header flag: refused, not skipped (a skipped exit path would lose four records).
        var noFlag = good
        noFlag[12] = 0
        let crc = CRC32C.checksum(Array(noFlag[0..<16]))
        for i in 0..<4 { noFlag[16 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        try Self.expectRefused(noFlag, at: UInt64(record), "without the header flag compactExitPaths")

        // A part this version does not define.
        var parts = good
        parts[record + 4] |= 0x08
        fixBlockCRC(&parts)
        try Self.expectRefused(parts, at: UInt64(record), "unknown exit-path part bits 0x8")

        // An action that does not exist.
        var action = good
        let a = try #require((record + 5..<record + 40).first { action[$0] == 0 && action[$0 - 1] == 2 && action[$0 - 2] == 0 })
        action[a] = 9
        fixBlockCRC(&action)
        try Self.expectRefused(action, at: UInt64(record), "unknown action 9")

        // A record cut short (its length says fewer bytes than its parts need).
        var short = good
        short[record + 2] = 3
        fixBlockCRC(&short)
        let r = try TraceReader(bytes: short)
        #expect(throws: TraceError.self) { while try r.next() != nil {} }

        // A header flag this version does not know: refused at the flags.
        var unknown = good
        unknown[12] = 3
        let crc2 = CRC32C.checksum(Array(unknown[0..<16]))
        for i in 0..<4 { unknown[16 + i] = UInt8(truncatingIfNeeded: crc2 >> (8 * UInt32(i))) }
        #expect { _ = try TraceReader(bytes: unknown) } throws: { e in
            (e as? TraceError)?.kind == .unsupportedVersion && (e as? TraceError)?.offset == 12
        }

        // A writer without the flag does not write one.
        let w = try TraceWriter(sink: MemoryTraceSink())
        #expect(throws: TraceError.self) {
            try w.appendExitPath(vcpu: 0, exit: TraceExit(), hierarchy: nil, exitControls: nil, action: 0, decision: nil, at: 1)
        }
        #expect(w.recordCount == 0)
    }

    /// The end record counts the records an exit path stands for: a count of physical records is
    /// refused.
    @Test func theEndRecordCountsTheRecordsAnExitPathStandsFor() throws {
        let good = try Self.oneExitPath()
        #expect(try readAll(good).last?.record == .end(recordCount: 5))
        // The end record is the last record of the only block: kind 0x7F, delta, length 1, count 5.
        var bad = good
        let end = try #require((0..<bad.count - 3).last { bad[$0] == 0x7F && bad[$0 + 2] == 1 && bad[$0 + 3] == 5 })
        bad[end + 3] = 2
        fixBlockCRC(&bad)
        #expect { _ = try readAll(bad) } throws: { e in
            (e as? TraceError)?.kind == .corrupt && "\(e)".contains("counts 2 records, the trace holds 5")
        }
    }
}
