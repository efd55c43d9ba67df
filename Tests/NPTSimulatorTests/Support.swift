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
