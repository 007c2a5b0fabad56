//// Kuma from Gleam: an entity-native event store for the BEAM.
////
//// ```gleam
//// import kuma
//// import kuma/entity
////
//// pub type UserEvent {
////   UserCreated(name: String, role: String)
//// }
////
//// pub fn main() {
////   let assert Ok(store) = kuma.start("./data", shards: 16)
////   let user = entity.spawn(store, id: "user_0x9A4F")
////   let assert Ok(1) = entity.append(user, UserCreated(name: "Dwighson", role: "architect"))
////   let assert Ok(UserCreated(name: "Dwighson", ..)) = entity.read(user)
//// }
//// ```
////
//// Kuma runs in the same BEAM as your Gleam code: its Elixir application (`kuma`) must be
//// loaded and started, as it is when the code runs under Mix. Every function here is a
//// thin call into the Elixir module `Kuma.Gleam`, which does the few conversions needed.

/// A running store.
pub type Store

/// Why a call failed: the reasons a caller can act on, and `Other` (with Kuma's sentence)
/// for the rest.
pub type KumaError {
  /// An append with an expected seq found the entity elsewhere.
  WrongExpectedSeq(expected: Int, actual: Int)
  /// The entity was erased: its id can never be written or read again.
  EntityErased
  /// The store has been stopped.
  StoreClosed
  /// No answer in time; a write may still commit.
  Timeout
  /// An entity of the latest event (`entity.spawn`) that has no event yet.
  NoEvents
  /// No store by that name is running.
  NoStore(name: String)
  /// A bad argument: `what` names it, `why` says why.
  Invalid(what: String, why: String)
  /// A size limit was exceeded.
  TooLarge(what: String, size: Int, max: Int)
  /// Stored data failed an integrity check at event `seq`.
  Corrupt(seq: Int, why: String)
  /// Another store (in this VM or another OS process) has the data dir open.
  DataDirLocked(path: String)
  /// A store of that name is already running.
  AlreadyStarted(name: String)
  /// Anything else, as Kuma words it.
  Other(message: String)
}

/// What an acknowledged append survives: `Normal` a crash of the VM, `Full` also power loss.
pub type SyncMode {
  Normal
  Full
}

/// Options of `start_with`.
pub type StartOption {
  DataDir(String)
  Shards(Int)
  /// The store's name (default: derived from the data dir).
  Name(String)
  Sync(SyncMode)
  /// Aggregate modules by their Erlang names, such as `"bank@account"` for `bank/account.gleam`.
  Aggregates(List(String))
  MasterKeyFile(String)
  Encryption(Bool)
  /// Serve Prometheus metrics and the live monitor on this port (127.0.0.1).
  Http(port: Int)
}

/// Starts a store on `data_dir` with `shards` shards (created if new). Encrypted, with the
/// master key from the `KUMA_MASTER_KEY` environment variable.
@external(erlang, "Elixir.Kuma.Gleam", "start")
pub fn start(data_dir: String, shards shards: Int) -> Result(Store, KumaError)

/// Starts a store with any of the options.
@external(erlang, "Elixir.Kuma.Gleam", "start_with")
pub fn start_with(options: List(StartOption)) -> Result(Store, KumaError)

/// Stops the store: everything acknowledged is on disk.
@external(erlang, "Elixir.Kuma.Gleam", "stop")
pub fn stop(store: Store) -> Result(Nil, KumaError)
