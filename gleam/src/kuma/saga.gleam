//// Sagas: steps sent to entities as idempotent commands, each undone by a compensation
//// when a later step fails; progress stored as the saga's own events, so a saga survives
//// restarts (see Kuma.Saga).
////
//// A saga is a module with `pub fn steps(args) -> List(Step(name, command))`:
////
//// ```gleam
//// pub type TransferStep { Debit Credit }
////
//// pub fn steps(t: Transfer) -> List(saga.Step(TransferStep, Command)) {
////   [
////     saga.Step(Debit, #("bank@account", t.from, Withdraw(t.amount)), undo: [
////       #("bank@account", t.from, Refund(t.amount)),
////     ]),
////     saga.Step(Credit, #("bank@account", t.to, Deposit(t.amount)), undo: []),
////   ]
//// }
//// ```

import kuma.{type KumaError, type Store}

/// A step: its name, the command it sends as `#(aggregate, entity_id, command)`, and the
/// command that undoes it (none, or one).
pub type Step(name, command) {
  Step(
    name: name,
    run: #(String, String, command),
    undo: List(#(String, String, command)),
  )
}

/// How a saga ended.
pub type Outcome(name, reason) {
  Completed
  Compensated(step: name, reason: reason)
}

/// Runs the saga module `saga` (its Erlang name, `"bank@transfer"`) as `id` with `args`
/// to its end; an `id` that exists is driven on from its log, whatever `args` says.
@external(erlang, "Elixir.Kuma.Gleam", "run_saga")
pub fn run(
  store: Store,
  saga saga: String,
  id id: String,
  args args: args,
) -> Result(Outcome(name, reason), KumaError)
