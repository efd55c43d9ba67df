import Synchronization

/// Backends by name. The simulator is registered in every registry by its creator and is the
/// default until another is chosen.
package final class BackendRegistry: Sendable {
    private struct State {
        var backends: [any Backend] = []
        var defaultName: String?
    }
    private let state = NPTMutex(State())
    package init() {}

    package func register(_ b: any Backend, makeDefault: Bool = false) throws(NPTError) {
        if NPTABI.major(of: b.abiVersion) != NPTABI.major {
            throw NPTError(.abiMismatch, "backend '\(b.name)' is built for ABI \(NPTABI.major(of: b.abiVersion)).x, this library is \(NPTABI.major).\(NPTABI.minor)")
        }
        if b.name.isEmpty { throw .invalid("backend name is empty") }
        let result: NPTError? = state.withLock { s in
            if s.backends.contains(where: { $0.name == b.name }) {
                return NPTError(.exists, "a backend named '\(b.name)' is already registered")
            }
            s.backends.append(b)
            if makeDefault || s.defaultName == nil { s.defaultName = b.name }
            return nil
        }
        if let result { throw result }
    }

    package var all: [any Backend] { state.withLock { $0.backends } }
    package var defaultName: String? { state.withLock { $0.defaultName } }

    package func setDefault(_ name: String) throws(NPTError) {
        let ok = state.withLock { s in
            guard s.backends.contains(where: { $0.name == name }) else { return false }
            s.defaultName = name
            return true
        }
        if !ok { throw NPTError(.notFound, "no backend named '\(name)'") }
    }

    /// The backend called `name`, or the default for nil.
    package func lookup(_ name: String?) throws(NPTError) -> any Backend {
        let found: (any Backend)? = state.withLock { s in
            let n = name ?? s.defaultName
            return s.backends.first { $0.name == n }
        }
        guard let found else {
            let known = all.map(\.name).joined(separator: ", ")
            throw NPTError(.notFound, "no backend named '\(name ?? "<default>")' (registered: \(known))")
        }
        return found
    }
}
