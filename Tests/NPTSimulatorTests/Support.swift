#if canImport(Glibc)
import Glibc
#endif
import NPTCore
import NPTSimulator


func makeSimVM(ram: UInt64, mode: VMConfig.MBECMode = .exact, perms: EPTPermissions = [.read, .write],
               budget: UInt64 = 0) throws -> VirtualMachine {
    let reg = BackendRegistry()
    try reg.register(SimulatorBackend(), makeDefault: true)
    return try VirtualMachine(config: VMConfig(ramSize: ram, defaultPermissions: perms, mbecMode: mode, maxStepsPerRun: budget),
                              registry: reg)
}

extension ReferenceMachine.Outcome {
    /// The reference outcome the emulation's exit corresponds to.
    init?(_ x: VMExit) {
        switch x.reason {
        case .budget: self = .stepped
        case .io: self = .io(port: x.ioPort, value: x.ioValue)
        case .halt: self = .halt
        case .mbecViolation: self = .violation(gpa: x.gpa.raw, gva: x.gva.raw, qualification: x.qualification)
        case .guestFault: self = .guestFault(vector: x.vector, error: x.qualification, address: x.gva.raw)
        default: return nil
        }
    }
    var stopsProgress: Bool {
        switch self { case .violation, .guestFault, .halt: true; default: false }
    }
    var fetchViolation: (gpa: UInt64, user: Bool)? {
        if case .violation(let g, _, let q) = self, q & ViolationQualification.fetch.rawValue != 0 {
            return (g, q & ViolationQualification.userLinear.rawValue != 0)
        }
        return nil
    }
    /// The emulation fetched the instruction at `rip` (whatever the instruction then did).
    func fetched(at rip: UInt64) -> Bool {
        switch self {
        case .violation(_, let gva, let q): return !(q & ViolationQualification.fetch.rawValue != 0 && gva == rip)
                && !(q & ViolationQualification.linearTranslation.rawValue == 0 && gva == rip)
        case .guestFault(let v, let e, let a):
            // A #PF on the fetch itself, or the #GP of a misaligned or non-canonical rip.
            let top = rip >> 47
            let badRip = rip & 7 != 0 || (top != 0 && top != 0x1FFFF)
            return !(a == rip && ((v == 14 && e & 16 != 0) || (v == 13 && badRip)))
        default: return true
        }
    }
    var executed: Bool {
        switch self { case .stepped, .io, .halt: true; default: false }
    }
}

/// Bytes of a file under Tests/Fixtures.
func fixture(_ relativePath: String) throws -> [UInt8] {
    let dir = String(#filePath.split(separator: "/", omittingEmptySubsequences: false).dropLast(2).joined(separator: "/"))
    let path = dir + "/Fixtures/" + relativePath
    guard let f = fopen(path, "rb") else { throw NPTError(.notFound, "cannot open \(path)") }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n <= 0 { break }
        out += buf[0..<n]
    }
    return out
}
