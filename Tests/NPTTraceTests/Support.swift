#if canImport(Glibc)
import Glibc
#endif

func getpidValue() -> Int32 { getpid() }
func unlinkFile(_ p: String) { _ = unlink(p) }

/// The repository's Tests/Fixtures directory (this file is Tests/NPTTraceTests/Support.swift).
func fixturesDirectory() -> String {
    var p = #filePath
    for _ in 0..<2 { p = String(p[..<p.lastIndex(of: "/")!]) }
    return p + "/Fixtures"
}

func readTextFile(_ path: String) -> String? {
    guard let f = fopen(path, "rb") else { return nil }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n == 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}
