//// Aggregates written in Gleam. A module is a Kuma aggregate when it has
////
//// ```gleam
//// pub fn init(id: String) -> State
//// pub fn apply(state: State, event: Event) -> State
//// pub fn handle(state: State, command: Command) -> Result(List(Event), Error)
//// ```
////
//// `handle` decides (its `Error(e)` refuses the command and writes nothing); `apply` folds
//// an event into the state, on every write and when the entity loads. Name the module by
//// its Erlang name once, with its types, and use that value wherever an entity of it is
//// addressed:
////
//// ```gleam
//// pub fn aggregate() -> Aggregate(Account, Command, Event, AccountError) {
////   aggregate.named("bank@account")   // src/bank/account.gleam
//// }
////
//// let alice = entity.of(store, aggregate: account.aggregate(), id: "alice")
//// ```
////
//// The store must be started knowing it: `kuma.Aggregates(["bank@account"])`.

/// An aggregate module, with the types of its state, commands, events and refusals.
pub opaque type Aggregate(state, command, event, error) {
  Aggregate(module: String)
}

/// The aggregate whose Erlang module is `module` (`"bank@account"` for `bank/account.gleam`).
pub fn named(module: String) -> Aggregate(state, command, event, error) {
  Aggregate(module:)
}

/// Its Erlang module name.
pub fn module_name(
  aggregate: Aggregate(state, command, event, error),
) -> String {
  aggregate.module
}
