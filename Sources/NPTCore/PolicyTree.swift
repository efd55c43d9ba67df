/// The MBEC policy, as the VM gives it, kept as a persistent 4-level radix tree with the layout of EPT:
/// level 4 = PML4 (512 GiB an entry), 3 = PDPT (1 GiB), 2 = PD (2 MiB), 1 = PT (4 KiB).
///
/// Nodes are immutable once built: an update copies only the path from the root to the changed
/// entries (at most 4 nodes a boundary of the range), so its cost does not depend on the guest's size,
/// and unchanged subtrees keep the shadow nodes derived from them (see `ShadowBuilder`).
/// A subtree whose pages all carry one permission collapses into a large leaf (2 MiB at level 2,
/// 1 GiB at level 3) and a large leaf splits when part of it changes.

@inlinable func levelSpan(_ level: Int) -> UInt64 { 1 << (12 + 9 * UInt64(level - 1)) }
package let entriesPerTable = 512

/// Sets of the 16 compact permission codes (R=1 W=2 SX=4 UX=8), as 16-bit masks.
enum CodeMask {
    static func make(_ pred: (UInt8) -> Bool) -> UInt16 {
        var m: UInt16 = 0
        for c in UInt8(0)..<16 where pred(c) { m |= 1 << UInt16(c) }
        return m
    }
    static let supervisorExec = make { $0 & 4 != 0 }
    static let userExec = make { $0 & 8 != 0 }
    static let supervisorOnly = make { $0 & 4 != 0 && $0 & 8 == 0 }
    static let userOnly = make { $0 & 8 != 0 && $0 & 4 == 0 }
}

package final class PolicyNode: @unchecked Sendable {
    package let level: Int
    /// Compact permission code of each entry that is a leaf (children[i] == nil).
    let codes: [UInt8]
    /// Child tables; empty at level 1.
    let children: [PolicyNode?]
    /// Bit c set iff some page of this subtree has code c.
    let mask: UInt16

    // Shadow nodes derived from this subtree. Written only by a `ShadowBuilder`, which runs under the
    // lock of the VM that owns the tree; read afterwards only through immutable snapshots.
    var unionShadow: ShadowNode?
    var supervisorShadow: ShadowNode?
    var userShadow: ShadowNode?

    init(level: Int, codes: [UInt8], children: [PolicyNode?]) {
        self.level = level
        self.codes = codes
        self.children = children
        var m: UInt16 = 0
        if children.isEmpty {
            for c in codes { m |= 1 << UInt16(c) }
        } else {
            for i in 0..<entriesPerTable {
                if let ch = children[i] { m |= ch.mask } else { m |= 1 << UInt16(codes[i]) }
            }
        }
        self.mask = m
    }

    static func uniform(level: Int, code: UInt8) -> PolicyNode {
        PolicyNode(level: level, codes: [UInt8](repeating: code, count: entriesPerTable),
                   children: level > 1 ? [PolicyNode?](repeating: nil, count: entriesPerTable) : [])
    }

    /// The code shared by every entry, if all entries are leaves with one code.
    var uniformCode: UInt8? {
        if children.contains(where: { $0 != nil }) { return nil }
        let c = codes[0]
        return codes.allSatisfy { $0 == c } ? c : nil
    }
}

/// A validated policy range.
package struct PolicyRange: Hashable, Sendable, CustomStringConvertible {
    package var range: GPARange
    package var pageSize: PageSize
    package var permissions: EPTPermissions
    package init(start: GPA, size: UInt64, pageSize: PageSize, permissions: EPTPermissions) {
        range = GPARange(start: start, size: size)
        self.pageSize = pageSize
        self.permissions = permissions
    }
    package var description: String { "\(range) \(pageSize) \(permissions)" }
}

package struct PolicyTree: Sendable {
    package private(set) var root: PolicyNode
    package let ramSize: UInt64

    /// Guest-physical addresses are limited to what 4-level EPT maps (48 bits).
    package static let maxGuestPhysical: UInt64 = 1 << 48

    package init(ramSize: UInt64, defaultPermissions: EPTPermissions) {
        self.ramSize = ramSize
        var root = PolicyNode.uniform(level: 4, code: 0)
        if ramSize > 0 {
            var ignored: UInt16 = 0
            root = PolicyTree.update(root, base: 0, lo: 0, hi: ramSize, code: defaultPermissions.code, oldMask: &ignored)
        }
        self.root = root
    }

    /// Checks a range against the rules of the ABI; throws the error the C caller gets.
    package func validate(_ r: PolicyRange) throws(NPTError) { try validate(r, bound: ramSize) }

    /// The same, with the range's end checked against `bound` instead of guest RAM.
    func validate(_ r: PolicyRange, bound: UInt64) throws(NPTError) {
        let ps = r.pageSize.bytes
        if r.range.size == 0 { throw .invalid("size is 0") }
        if r.range.start.raw % ps != 0 {
            throw NPTError(.misaligned, "gpa \(hex(r.range.start.raw)) is not aligned to page_size \(hex(ps))")
        }
        if r.range.size % ps != 0 {
            throw NPTError(.misaligned, "size \(hex(r.range.size)) is not a multiple of page_size \(hex(ps))")
        }
        if !r.permissions.isValidPolicy {
            throw .invalid("perms \(hex(r.permissions.rawValue)): only bits 0, 1, 2 and 10, and write needs read")
        }
        let (end, overflow) = r.range.start.raw.addingReportingOverflow(r.range.size)
        if overflow || end > bound {
            throw NPTError(.outOfRange, "range \(r.range) ends past guest RAM (\(hex(ramSize)))")
        }
    }

    /// Applies one validated range. Returns the set of codes the range held before (as a mask).
    @discardableResult
    package mutating func apply(_ r: PolicyRange) -> UInt16 {
        var old: UInt16 = 0
        root = PolicyTree.update(root, base: 0, lo: r.range.start.raw, hi: r.range.end,
                                 code: r.permissions.code, oldMask: &old)
        return old
    }

    /// The permissions of the page holding `gpa` (none outside RAM).
    package func permissions(at gpa: GPA) -> EPTPermissions {
        var node = root
        while true {
            let i = Int((gpa.raw >> (12 + 9 * UInt64(node.level - 1))) & 511)
            if node.level > 1, let c = node.children[i] { node = c; continue }
            return EPTPermissions(code: node.codes[i])
        }
    }

    static func update(_ node: PolicyNode, base: UInt64, lo: UInt64, hi: UInt64, code: UInt8,
                       oldMask: inout UInt16) -> PolicyNode {
        let level = node.level
        let span = levelSpan(level)
        var codes = node.codes
        var children = node.children
        let first = Int((lo - base) / span)
        let last = Int((hi - 1 - base) / span)
        for i in first...last {
            let eb = base + UInt64(i) * span
            let ee = eb + span
            let full = lo <= eb && ee <= hi
            if full && level <= 3 {
                if let c = children.isEmpty ? nil : children[i] { oldMask |= c.mask; children[i] = nil }
                else { oldMask |= 1 << UInt16(codes[i]) }
                codes[i] = code
            } else {
                let child = children[i] ?? PolicyNode.uniform(level: level - 1, code: codes[i])
                let updated = update(child, base: eb, lo: max(lo, eb), hi: min(hi, ee), code: code, oldMask: &oldMask)
                if level <= 3, let u = updated.uniformCode {
                    children[i] = nil
                    codes[i] = u
                } else {
                    children[i] = updated
                }
            }
        }
        return PolicyNode(level: level, codes: codes, children: children)
    }

    /// Each maximal run of pages with one permission, in GPA order (for inspection and tests).
    package func runs() -> [(GPARange, EPTPermissions)] {
        var out: [(GPARange, EPTPermissions)] = []
        func visit(_ n: PolicyNode, _ base: UInt64) {
            let span = levelSpan(n.level)
            for i in 0..<entriesPerTable {
                let eb = base + UInt64(i) * span
                if eb >= ramSize { return }
                if n.level > 1, let c = n.children[i] { visit(c, eb); continue }
                let p = EPTPermissions(code: n.codes[i])
                let size = min(span, ramSize - eb)
                if let lastRun = out.last, lastRun.1 == p, lastRun.0.end == eb {
                    out[out.count - 1].0.size += size
                } else {
                    out.append((GPARange(start: GPA(eb), size: size), p))
                }
            }
        }
        visit(root, 0)
        return out
    }
}
