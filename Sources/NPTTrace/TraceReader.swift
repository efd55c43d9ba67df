// The streaming trace reader: an iterator over records in O(1) memory (one block, at most
// TraceFormat.maxBlockPayload bytes), verifying each block's checksum before yielding any of its
// records. The first error is sticky: nothing past it is ever returned.

package final class TraceReader {
    let source: any TraceSource
    package let major: UInt16
    package let minor: UInt16
    package let flags: UInt32
    /// Records of kinds this version does not know (a newer minor's), skipped.
    package private(set) var skippedUnknown: UInt64 = 0
    /// Exit-path records read (each returned as the 2 to 4 records it stands for).
    package private(set) var exitPathRecords: UInt64 = 0
    /// Records read so far (skipped ones included, an exit-path record counting as the records it
    /// stands for): the index of the next one.
    package private(set) var recordIndex: UInt64 = 0
    /// Bytes consumed from the source (headers and whole blocks).
    package private(set) var bytesRead: UInt64 = 0
    package private(set) var timestamp: UInt64 = 0
    package private(set) var sawEnd = false
    /// One block's payload (TraceFormat.maxBlockPayload bytes, reused) and the block header.
    let block: UnsafeMutableRawBufferPointer
    let header: UnsafeMutableRawBufferPointer
    var blockLength = 0
    var pos = 0
    var blockOffset: UInt64 = 0
    var recordsLeft: UInt32 = 0
    var state = ExitState()
    var failure: TraceError?
    var firstBlock = true
    /// The records of the last exit-path record not yet returned (`expanded[expandedNext...]`),
    /// with that record's offset and timestamp and the index of the first.
    var expanded: [TraceRecord] = []
    var expandedNext = 0
    var expandedAt = (offset: UInt64(0), timestamp: UInt64(0), index: UInt64(0))

    /// Reads and checks the header: magic, major version, checksum.
    package init(source: any TraceSource) throws(TraceError) {
        self.source = source
        (major, minor, flags) = try TraceReader.readHeader(source)
        bytesRead = UInt64(TraceFormat.headerSize)
        block = .allocate(byteCount: TraceFormat.maxBlockPayload, alignment: 8)
        header = .allocate(byteCount: TraceFormat.blockHeaderSize, alignment: 8)
    }

    static func readHeader(_ source: any TraceSource) throws(TraceError) -> (UInt16, UInt16, UInt32) {
        let hp = UnsafeMutableRawBufferPointer.allocate(byteCount: TraceFormat.headerSize, alignment: 8)
        defer { hp.deallocate() }
        let n = try source.read(into: hp)
        let h = Array(hp)
        let magicLen = TraceFormat.magic.count
        let short = TraceError(.truncated, at: 0, "the header needs \(TraceFormat.headerSize) bytes, the trace has \(n)")
        if n < magicLen || Array(h[0..<magicLen]) != TraceFormat.magic {
            if n < magicLen && Array(h[0..<n]) == Array(TraceFormat.magic[0..<n]) { throw short }
            throw TraceError(.badMagic, at: 0, "the first bytes are not \"NPTTRACE\"")
        }
        guard n >= 10 else { throw short }
        let major = UInt16(h[8]) | UInt16(h[9]) << 8
        guard major == TraceFormat.major else {
            throw TraceError(.unsupportedVersion, at: 8, "major version \(major); this reader reads version \(TraceFormat.major).x")
        }
        guard n == TraceFormat.headerSize else { throw short }
        let p = UnsafeRawBufferPointer(hp)
        let (minor, flags, crc) = (UInt16(p[10]) | UInt16(p[11]) << 8, readLE32(p, 12), readLE32(p, 16))
        guard crc == CRC32C.update(0, UnsafeRawBufferPointer(rebasing: p[0..<16])) else {
            throw TraceError(.corrupt, at: 0, "header checksum mismatch")
        }
        guard flags & ~TraceFormat.knownFlags == 0 else {
            throw TraceError(.unsupportedVersion, at: 12, "header flags \(hex(UInt64(flags))): this reader knows \(hex(UInt64(TraceFormat.knownFlags))) (version \(TraceFormat.major).\(TraceFormat.minor))")
        }
        return (major, minor, flags)
    }

    package convenience init(path: String) throws(TraceError) { try self.init(source: try FileTraceSource(path: path)) }
    package convenience init(bytes: [UInt8]) throws(TraceError) { try self.init(source: MemoryTraceSource(bytes)) }

    deinit { block.deallocate(); header.deallocate() }

    func fail(_ e: TraceError) -> TraceError { failure = e; return e }

    func readFully(_ buf: UnsafeMutableRawBufferPointer) throws(TraceError) -> Int { try source.read(into: buf) }

    /// Loads and verifies the next block; false at the clean end of the trace.
    func loadBlock() throws(TraceError) -> Bool {
        let at = bytesRead
        let n = try readFully(header)
        let h = UnsafeRawBufferPointer(header)
        if n == 0 {
            if sawEnd { return false }
            throw TraceError(.truncated, at: at, "the trace ends after \(recordIndex) records without its end record (the writer did not finish)")
        }
        if sawEnd { throw TraceError(.corrupt, at: at, "data after the end record") }
        guard n == TraceFormat.blockHeaderSize else {
            throw TraceError(.truncated, at: at, "a block header needs \(TraceFormat.blockHeaderSize) bytes, the trace has \(n) left")
        }
        let (length, crc, base, count) = (readLE32(h, 0), readLE32(h, 4), readLE64(h, 8), readLE32(h, 16))
        guard length <= UInt32(TraceFormat.maxBlockPayload) else {
            throw TraceError(.corrupt, at: at, "a block of \(length) bytes (at most \(TraceFormat.maxBlockPayload))")
        }
        let got = try readFully(UnsafeMutableRawBufferPointer(rebasing: block[0..<Int(length)]))
        guard got == Int(length) else {
            throw TraceError(.truncated, at: at, "a block of \(length) bytes at byte offset \(at + 20) has only \(got) (the trace ends at byte offset \(at + 20 + UInt64(got)))")
        }
        var c = CRC32C.update(0, UnsafeRawBufferPointer(rebasing: h[0..<4]))
        c = CRC32C.update(c, UnsafeRawBufferPointer(rebasing: h[8..<20]))
        c = CRC32C.update(c, UnsafeRawBufferPointer(rebasing: block[0..<Int(length)]))
        guard c == crc else {
            throw TraceError(.corrupt, at: at, "checksum mismatch in the block of bytes \(at)..<\(at + 20 + UInt64(length))")
        }
        guard count > 0 else { throw TraceError(.corrupt, at: at, "a block with no record") }
        guard firstBlock || base >= timestamp else {
            throw TraceError(.outOfOrder, at: at, "the block starts at \(base) ns, before the previous record's \(timestamp) ns")
        }
        firstBlock = false
        blockOffset = at
        blockLength = Int(length)
        pos = 0
        recordsLeft = count
        timestamp = base
        state = ExitState()
        bytesRead = at + 20 + UInt64(length)
        return true
    }

    /// The next record, or nil at the end record's block end. Throws the first error (with its
    /// byte offset) and then again on every later call.
    package func next() throws(TraceError) -> TraceEvent? {
        if let f = failure { throw f }
        if expandedNext < expanded.count {
            let k = expandedNext
            expandedNext += 1
            return TraceEvent(index: expandedAt.index + UInt64(k), offset: expandedAt.offset, timestamp: expandedAt.timestamp,
                              record: expanded[k])
        }
        do throws(TraceError) {
            while true {
                if pos >= blockLength {
                    if recordsLeft != 0 {
                        throw TraceError(.corrupt, at: blockOffset, "the block declares \(recordsLeft) more records than it holds")
                    }
                    guard try loadBlock() else { return nil }
                }
                if let e = try decodeOne() { return e }
            }
        } catch let e {
            throw fail(e)
        }
    }

    func decodeOne() throws(TraceError) -> TraceEvent? {
        let recOffset = blockOffset + 20 + UInt64(pos)
        let p = UnsafeRawBufferPointer(block)
        do {
            var frame = ByteDecoder(base: p, pos: pos, end: blockLength, recordOffset: recOffset, recordIndex: recordIndex, kind: nil)
            if sawEnd { throw TraceError(.corrupt, at: recOffset, "a record after the end record") }
            guard recordsLeft > 0 else { throw TraceError(.corrupt, at: recOffset, "the block holds more records than it declares") }
            let kind = try frame.u8()
            let delta = try frame.varint()
            let length = try frame.varint()
            guard length <= UInt64(frame.remaining) else {
                throw TraceError(.invalidRecord, at: recOffset, "record \(recordIndex): \(length) bytes with \(frame.remaining) left in the block")
            }
            let (t, overflow) = timestamp.addingReportingOverflow(delta)
            guard !overflow else { throw TraceError(.invalidRecord, at: recOffset, "record \(recordIndex): the timestamp overflows 64 bits") }
            let payloadEnd = frame.pos + Int(length)
            let index = recordIndex
            timestamp = t
            recordsLeft -= 1
            recordIndex += 1
            pos = payloadEnd
            guard RecordKind.isKnown(kind) else {
                skippedUnknown += 1
                return nil
            }
            var d = ByteDecoder(base: p, pos: frame.pos, end: payloadEnd, recordOffset: recOffset, recordIndex: index, kind: kind)
            if kind == RecordKind.exitPath {
                guard flags & TraceFormat.compactExitPaths != 0 else {
                    throw TraceError(.invalidRecord, at: recOffset, "record \(index): an exit-path record (kind 0x27) in a trace without the header flag compactExitPaths")
                }
                exitPathRecords += 1
                expanded.removeAll(keepingCapacity: true)
                try TraceCodec.decodeExitPath(&d, &state, into: &expanded)
                recordIndex = index + UInt64(expanded.count)
                expandedAt = (recOffset, t, index)
                expandedNext = 1
                return TraceEvent(index: index, offset: recOffset, timestamp: t, record: expanded[0])
            }
            let r = try TraceCodec.decode(kind: kind, &d, &state)
            if case .end(let n) = r {
                guard n == index else {
                    throw TraceError(.corrupt, at: recOffset, "the end record counts \(n) records, the trace holds \(index)")
                }
                sawEnd = true
            }
            return TraceEvent(index: index, offset: recOffset, timestamp: t, record: r)
        }
    }

    /// Calls `body` for every record up to the end record (excluded).
    package func forEach(_ body: (TraceEvent) throws -> Void) throws {
        while let e = try next() {
            if case .end = e.record { continue }
            try body(e)
        }
    }
}
