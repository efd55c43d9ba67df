/// Opcodes of the simulator's guest ISA (docs/guest-isa.md). Every instruction is 8 bytes:
/// opcode, register a, register b, 0, signed imm32 (little-endian).
package enum Opcode: UInt8, Sendable, CaseIterable {
    case nop = 0x00, movi = 0x01, movhi = 0x02, mov = 0x03, add = 0x04, addi = 0x05
    case load = 0x06, store = 0x07, jmp = 0x08, jmpr = 0x09, jz = 0x0A, jnz = 0x0B
    case syscall = 0x0C, sysret = 0x0D, hlt = 0x0E, out = 0x0F, movcr3 = 0x10, iret = 0x11, sub = 0x12
    case rsm = 0x13
    /// CLWB [a+imm]: write the cache line back (persistent memory); permission checks of a load.
    case clwb = 0x14
    /// SFENCE: this CPU's earlier stores and write-backs are accepted by the memory controllers.
    case sfence = 0x15
}

package enum Vector {
    package static let undefinedOpcode: UInt32 = 6
    package static let generalProtection: UInt32 = 13
    package static let pageFault: UInt32 = 14
    package static let virtualizationException: UInt32 = 20
}

/// Encodes instructions; the demo, the tests and the benchmarks write their guests with it.
package struct Assembler: Sendable {
    package private(set) var bytes: [UInt8] = []
    /// Guest-virtual address of the first instruction.
    package let origin: UInt64
    package init(origin: UInt64) { self.origin = origin }

    /// Address of the next instruction.
    package var here: UInt64 { origin + UInt64(bytes.count) }

    package mutating func emit(_ op: Opcode, _ a: UInt8 = 0, _ b: UInt8 = 0, _ imm: Int32 = 0) {
        bytes += [op.rawValue, a, b, 0]
        withUnsafeBytes(of: imm.littleEndian) { bytes += $0 }
    }
    package static func encode(_ op: Opcode, _ a: UInt8 = 0, _ b: UInt8 = 0, _ imm: Int32 = 0) -> [UInt8] {
        var x = Assembler(origin: 0); x.emit(op, a, b, imm); return x.bytes
    }

    /// Loads a 64-bit constant (MOVI + MOVHI).
    package mutating func load64(_ r: UInt8, _ v: UInt64) {
        emit(.movi, r, 0, Int32(bitPattern: UInt32(truncatingIfNeeded: v)))
        emit(.movhi, r, 0, Int32(bitPattern: UInt32(truncatingIfNeeded: v >> 32)))
    }
    package mutating func nop() { emit(.nop) }
    /// The relative immediate that makes a branch emitted next land on `target`.
    package func offset(to target: UInt64) -> Int32 {
        Int32(truncatingIfNeeded: Int64(bitPattern: target &- (here &+ 8)))
    }
    package mutating func jz(_ r: UInt8, to target: UInt64) { emit(.jz, r, 0, offset(to: target)) }
    package mutating func jnz(_ r: UInt8, to target: UInt64) { emit(.jnz, r, 0, offset(to: target)) }
    package mutating func jmp(to target: UInt64) { emit(.jmp, 0, 0, offset(to: target)) }
    package mutating func out(_ r: UInt8, port: Int32) { emit(.out, r, 0, port) }
    package mutating func jump(to target: UInt64, via r: UInt8) { load64(r, target); emit(.jmpr, r) }
}
