/// EPT permissions as the VM gives them in an MBEC policy, at the Intel SDM bit positions:
/// bit 0 read, bit 1 write, bit 2 execute (supervisor-mode linear addresses under MBEC),
/// bit 10 user-mode execute.
package struct EPTPermissions: OptionSet, Hashable, Sendable, CustomStringConvertible {
    package var rawValue: UInt64
    package init(rawValue: UInt64) { self.rawValue = rawValue }

    package static let read = EPTPermissions(rawValue: 1 << 0)
    package static let write = EPTPermissions(rawValue: 1 << 1)
    package static let supervisorExecute = EPTPermissions(rawValue: 1 << 2)
    package static let userExecute = EPTPermissions(rawValue: 1 << 10)
    package static let all: EPTPermissions = [.read, .write, .supervisorExecute, .userExecute]
    package static let none: EPTPermissions = []

    /// Write without read is an EPT misconfiguration (SDM 29.3.3.1); a policy may not ask for it.
    package var isValidPolicy: Bool {
        rawValue & ~EPTPermissions.all.rawValue == 0 && !(contains(.write) && !contains(.read))
    }

    /// The compact 4-bit code used inside the policy tree (R=1, W=2, SX=4, UX=8).
    @inlinable package var code: UInt8 {
        UInt8(truncatingIfNeeded: (rawValue & 0x7) | ((rawValue >> 7) & 0x8))
    }
    @inlinable package init(code: UInt8) {
        self.init(rawValue: UInt64(code & 0x7) | (UInt64(code & 0x8) << 7))
    }

    package var description: String {
        var s = ""
        s += contains(.read) ? "R" : "-"
        s += contains(.write) ? "W" : "-"
        s += contains(.supervisorExecute) ? "Xs" : "--"
        s += contains(.userExecute) ? "Xu" : "--"
        return s
    }
}

/// The shadow hierarchies. Hardware without MBEC has one execute bit; each hierarchy puts a
/// different policy bit into it.
package enum HierarchyID: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// X = supervisor-execute (bit 2 of the policy).
    case supervisor = 0
    /// X = user-execute (bit 10 of the policy).
    case user = 1

    package var description: String { self == .supervisor ? "supervisor" : "user" }
    /// The hierarchy whose execute bit governs fetches from this kind of linear address.
    package static func governing(userLinear: Bool) -> HierarchyID { userLinear ? .user : .supervisor }
}

/// Permission bits of a single-execute-bit EPT entry (what a shadow hierarchy holds).
package struct ShadowPermissions: OptionSet, Hashable, Sendable {
    package var rawValue: UInt64
    package init(rawValue: UInt64) { self.rawValue = rawValue }
    package static let read = ShadowPermissions(rawValue: 1)
    package static let write = ShadowPermissions(rawValue: 2)
    package static let execute = ShadowPermissions(rawValue: 4)
}

extension EPTPermissions {
    /// What a hierarchy exposes for a page with this policy.
    @inlinable package func projected(onto h: HierarchyID) -> ShadowPermissions {
        var r = rawValue & 0x3
        let x: EPTPermissions = h == .supervisor ? .supervisorExecute : .userExecute
        if contains(x) { r |= 4 }
        return ShadowPermissions(rawValue: r)
    }
}
