/// What a backend is told beyond what it must do (the default of `BackendVCPU.exitDecided`), and
/// how a backend that wraps another says so.

extension BackendVCPU {
    /// A backend that runs guest code has nothing to do with the core's answer to an exit.
    public func exitDecided(_ action: ExitAction, exit: VMExit) throws(NPTError) {}
}

/// A backend that adds something around another one (the recording layer, a backend with
/// capabilities withheld): `wrapped` is the one that does the work, for a VMM that looks for a
/// property of the real backend (a scenario's crash checker watching the simulator's platform).
public protocol BackendWrapper: Backend {
    var wrapped: any Backend { get }
}

extension Backend {
    /// The innermost backend behind any wrappers.
    public var unwrapped: any Backend {
        var b: any Backend = self
        while let w = b as? any BackendWrapper { b = w.wrapped }
        return b
    }
}
