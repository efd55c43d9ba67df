/// Shadow nested page table hierarchies for hardware with one execute bit.
///
/// From one policy the core derives one hierarchy per `HierarchyID`: in the supervisor hierarchy the
/// X bit (bit 2) of a page is the policy's supervisor-execute bit, in the user hierarchy it is the
/// policy's user-execute bit; R and W are the policy's in both.
///
/// Sharing. EPT ANDs the permission bits of every level of a walk (Intel SDM 29.3.3), so one table can
/// serve both hierarchies whenever the parent entry's X bit can make up the difference. For a subtree T
/// let the *union* table hold, for each page, X = SX | UX. Hierarchy h can use the union table
///  - with X = 0 in its parent entry, if no page of T is executable in h's mode, and
///  - with X = 1, if every page of T that is executable in the other mode is executable in h's too.
/// Only subtrees that hold pages executable in one mode only *and* pages executable in the other mode
/// only need a table of their own per hierarchy. Because typical code is clustered (kernel code in one
/// place, user code in others), almost every table is shared; only the roots and the tables above
/// mixed regions are duplicated.

/// One 4 KiB table of a shadow hierarchy: 512 EPT-format entries (bits 0-2 R/W/X, bit 7 large leaf,
/// bits 12-51 the address: a page's offset in the backing memory, or for a table entry the child's
/// pseudo-physical address `id << 12`).
package final class ShadowNode: Sendable {
    package let level: Int
    package let entries: [UInt64]
    package let children: [ShadowNode?]
    package let id: UInt64

    init(level: Int, entries: [UInt64], children: [ShadowNode?], id: UInt64) {
        self.level = level; self.entries = entries; self.children = children; self.id = id
    }

    package static let largeBit: UInt64 = 1 << 7
    package static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000
}

/// The result of walking one hierarchy for one guest-physical address.
package struct ShadowTranslation: Sendable, Equatable {
    /// Leaf level (1, 2, 3) or 0 when some entry on the way was not present.
    package var level: Int
    /// Effective permissions: the AND of bits 0-2 across every entry used.
    package var permissions: ShadowPermissions
    /// Base of the leaf's page and its offset in the backing memory.
    package var pageBase: GPA
    package var hostOffset: HPA
    package var pageSize: UInt64 { level == 0 ? 0 : levelSpan(level) }
    package var present: Bool { level != 0 && permissions.rawValue != 0 }
}

/// Roots of every hierarchy at one moment. Immutable: a vCPU may walk it while the core builds the next.
package struct ShadowSnapshot: Sendable {
    package let roots: [ShadowNode]
    package let generation: UInt64
    package func root(_ h: HierarchyID) -> ShadowNode { roots[Int(h.rawValue)] }

    package func translate(_ gpa: GPA, in h: HierarchyID) -> ShadowTranslation {
        // 4-level EPT maps 48 bits; a guest PTE may name more (up to bit 51): nothing is there.
        guard gpa.raw < PolicyTree.maxGuestPhysical else {
            return ShadowTranslation(level: 0, permissions: [], pageBase: GPA(gpa.raw & ~0xFFF), hostOffset: HPA(0))
        }
        var node = root(h)
        var perms: UInt64 = 7
        while true {
            let shift = 12 + 9 * UInt64(node.level - 1)
            let i = Int((gpa.raw >> shift) & 511)
            let e = node.entries[i]
            if e & 7 == 0 {
                return ShadowTranslation(level: 0, permissions: [], pageBase: GPA(gpa.raw & ~((1 << shift) - 1)), hostOffset: HPA(0))
            }
            perms &= e & 7
            if node.level == 1 || e & ShadowNode.largeBit != 0 {
                let mask = (UInt64(1) << shift) - 1
                return ShadowTranslation(level: node.level, permissions: ShadowPermissions(rawValue: perms),
                                         pageBase: GPA(gpa.raw & ~mask), hostOffset: HPA(e & ShadowNode.addressMask))
            }
            node = node.children[i]!
        }
    }

    /// Visits every leaf that grants some access, in GPA order, with its effective permissions.
    package func forEachLeaf(in h: HierarchyID, _ body: (GPA, UInt64, ShadowPermissions) -> Void) {
        func visit(_ n: ShadowNode, _ base: UInt64, _ inherited: UInt64) {
            let span = levelSpan(n.level)
            for i in 0..<entriesPerTable {
                let e = n.entries[i]
                if e & 7 == 0 { continue }
                let eb = base + UInt64(i) * span
                let p = inherited & e & 7
                if n.level == 1 || e & ShadowNode.largeBit != 0 {
                    if p != 0 { body(GPA(eb), span, ShadowPermissions(rawValue: p)) }
                } else {
                    visit(n.children[i]!, eb, p)
                }
            }
        }
        visit(root(h), 0, 7)
    }

    /// Table pages reachable from all roots together, and from one hierarchy alone.
    package func nodeCounts() -> (all: Int, perHierarchy: [Int]) {
        var all = Set<ObjectIdentifier>()
        var per: [Int] = []
        for r in roots {
            var mine = Set<ObjectIdentifier>()
            var stack = [r]
            while let n = stack.popLast() {
                guard mine.insert(ObjectIdentifier(n)).inserted else { continue }
                all.insert(ObjectIdentifier(n))
                for c in n.children { if let c { stack.append(c) } }
            }
            per.append(mine.count)
        }
        return (all.count, per)
    }
}

/// Derives shadow tables from policy nodes, memoizing them on the policy nodes, so that after an
/// update only the tables above changed policy nodes are rebuilt. Not thread safe: the owning VM
/// calls it under its lock.
package struct ShadowBuilder: Sendable {
    private var nextID: UInt64 = 1
    package private(set) var nodesBuilt: UInt64 = 0
    /// Where the privileged-mode region's pages live in the backing memory (RAM is identity mapped).
    package var region: (range: GPARange, hostOffset: UInt64)? {
        didSet { rebuildWindows() }
    }
    /// Further guest-physical windows that are not identity mapped (NVDIMM ranges, the vFHA page).
    package var extraWindows: [(range: GPARange, hostOffset: UInt64)] = [] {
        didSet { rebuildWindows() }
    }
    private var windows: [(range: GPARange, hostOffset: UInt64)] = []
    package init() {}

    private mutating func rebuildWindows() {
        windows = extraWindows
        if let region { windows.append(region) }
    }

    private func leafEntry(code: UInt8, xBits: UInt8, level: Int, address: UInt64) -> UInt64 {
        var p = UInt64(code & 3)
        if code & xBits != 0 { p |= 4 }
        if p == 0 { return 0 }
        var host = address
        for w in windows where w.range.contains(GPA(address)) { host = w.hostOffset + (address - w.range.start.raw); break }
        return p | (level > 1 ? ShadowNode.largeBit : 0) | host
    }

    /// A large leaf maps one contiguous stretch of backing memory, so it may not cover a window's
    /// boundary (a block that is partly RAM and partly a window, both with one policy, is split).
    private func straddlesWindow(_ base: UInt64, _ span: UInt64) -> Bool {
        let block = GPARange(start: GPA(base), size: span)
        for w in windows where w.range.overlaps(block) {
            if !(w.range.start.raw <= base && base + span <= w.range.end) { return true }
        }
        return false
    }

    private mutating func make(level: Int, entries: [UInt64], children: [ShadowNode?]) -> ShadowNode {
        defer { nextID += 1; nodesBuilt += 1 }
        return ShadowNode(level: level, entries: entries, children: children, id: nextID)
    }

    /// Builds the table for `p` whose X bit is set from the policy bits in `xBits`
    /// (4 = SX, 8 = UX, 12 = the union).
    private mutating func table(_ p: PolicyNode, base: UInt64, xBits: UInt8) -> ShadowNode {
        let span = levelSpan(p.level)
        var entries = [UInt64](repeating: 0, count: entriesPerTable)
        var children = p.level > 1 ? [ShadowNode?](repeating: nil, count: entriesPerTable) : []
        for i in 0..<entriesPerTable {
            let eb = base + UInt64(i) * span
            if p.level > 1, let c = p.children[i] {
                let (node, x) = xBits == 12 ? (union(c, base: eb), true)
                                            : reference(c, base: eb, hierarchy: xBits == 4 ? .supervisor : .user)
                children[i] = node
                entries[i] = 3 | (x ? 4 : 0) | ((node.id << 12) & ShadowNode.addressMask)
            } else if p.level > 1 && p.codes[i] != 0 && !windows.isEmpty && straddlesWindow(eb, span) {
                let node = table(PolicyNode.uniform(level: p.level - 1, code: p.codes[i]), base: eb, xBits: xBits)
                children[i] = node
                entries[i] = 7 | ((node.id << 12) & ShadowNode.addressMask)
            } else {
                entries[i] = leafEntry(code: p.codes[i], xBits: xBits, level: p.level, address: eb)
            }
        }
        return make(level: p.level, entries: entries, children: children)
    }

    private mutating func union(_ p: PolicyNode, base: UInt64) -> ShadowNode {
        if let u = p.unionShadow { return u }
        let u = table(p, base: base, xBits: 12)
        p.unionShadow = u
        return u
    }

    /// The table hierarchy `h` uses for subtree `p`, and the X bit of the parent entry.
    private mutating func reference(_ p: PolicyNode, base: UInt64, hierarchy h: HierarchyID) -> (ShadowNode, Bool) {
        let mine = h == .supervisor ? CodeMask.supervisorExec : CodeMask.userExec
        let otherOnly = h == .supervisor ? CodeMask.userOnly : CodeMask.supervisorOnly
        if p.mask & mine == 0 { return (union(p, base: base), false) }
        if p.mask & otherOnly == 0 { return (union(p, base: base), true) }
        return (distinct(p, base: base, hierarchy: h), true)
    }

    private mutating func distinct(_ p: PolicyNode, base: UInt64, hierarchy h: HierarchyID) -> ShadowNode {
        if let n = h == .supervisor ? p.supervisorShadow : p.userShadow { return n }
        let n = table(p, base: base, xBits: h == .supervisor ? 4 : 8)
        if h == .supervisor { p.supervisorShadow = n } else { p.userShadow = n }
        return n
    }

    /// Roots of every hierarchy for the policy `tree`; roots are always per hierarchy (no parent
    /// entry exists to carry an X bit).
    package mutating func snapshot(of tree: PolicyTree, generation: UInt64) -> ShadowSnapshot {
        ShadowSnapshot(roots: HierarchyID.allCases.map { distinct(tree.root, base: 0, hierarchy: $0) },
                       generation: generation)
    }
}

/// What changed for each hierarchy when a range of the policy changed (the INVEPT analogue).
package struct Invalidation: Hashable, Sendable, CustomStringConvertible {
    package var hierarchy: HierarchyID
    package var range: GPARange
    package init(hierarchy: HierarchyID, range: GPARange) { self.hierarchy = hierarchy; self.range = range }
    package var description: String { "invalidate \(hierarchy) \(range)" }

    /// The hierarchies in which a range that held the codes of `oldMask` now holding `new` changed.
    static func needed(range: GPARange, oldMask: UInt16, new: EPTPermissions) -> [Invalidation] {
        HierarchyID.allCases.compactMap { h in
            let target = new.projected(onto: h)
            for c in UInt8(0)..<16 where oldMask & (1 << UInt16(c)) != 0 {
                if EPTPermissions(code: c).projected(onto: h) != target {
                    return Invalidation(hierarchy: h, range: range)
                }
            }
            return nil
        }
    }
}
