//// Entities: one process and one event stream per id. Reads come from memory.
////
//// Entities of an aggregate written in Gleam are addressed with `of` (see `kuma/aggregate`);
//// `spawn` gives an entity whose state is simply its latest event.

import kuma.{type KumaError, type Store}
import kuma/aggregate.{type Aggregate}

/// An entity: its store, its aggregate and its id. Making one starts nothing.
pub type Entity(state, command, event, error)

/// Why a command was not applied: the aggregate refused it, or Kuma failed.
pub type ExecuteError(error) {
  Rejected(error)
  Failed(KumaError)
}

/// A stored event with where and when it was stored.
pub type Envelope(event) {
  Envelope(
    entity_id: String,
    seq: Int,
    position: Int,
    shard: Int,
    event_type: String,
    timestamp: Int,
    data: event,
  )
}

/// An entity whose state is its latest event (no aggregate needed).
@external(erlang, "Elixir.Kuma.Gleam", "spawn")
pub fn spawn(store: Store, id id: String) -> Entity(event, Nil, event, Nil)

/// An entity of an aggregate (see `kuma/aggregate`): its state, commands, events and
/// refusals have the aggregate's types.
pub fn of(
  store: Store,
  aggregate aggregate: Aggregate(state, command, event, error),
  id id: String,
) -> Entity(state, command, event, error) {
  of_module(store, aggregate.module_name(aggregate), id)
}

@external(erlang, "Elixir.Kuma.Gleam", "of")
fn of_module(
  store: Store,
  aggregate: String,
  id: String,
) -> Entity(state, command, event, error)

/// Appends one event; the entity's new last seq.
pub fn append(
  entity: Entity(state, command, event, error),
  event: event,
) -> Result(Int, KumaError) {
  append_many(entity, [event])
}

/// Appends events atomically: all of them or none.
@external(erlang, "Elixir.Kuma.Gleam", "append")
pub fn append_many(
  entity: Entity(state, command, event, error),
  events: List(event),
) -> Result(Int, KumaError)

/// Runs a command through the aggregate's `handle` and appends its events.
@external(erlang, "Elixir.Kuma.Gleam", "execute")
pub fn execute(
  entity: Entity(state, command, event, error),
  command: command,
) -> Result(Int, ExecuteError(error))

/// The current state, from memory.
@external(erlang, "Elixir.Kuma.Gleam", "read")
pub fn read(
  entity: Entity(state, command, event, error),
) -> Result(state, KumaError)

/// Every event of the entity, in order, each hash-chained to the one before.
@external(erlang, "Elixir.Kuma.Gleam", "history")
pub fn history(
  entity: Entity(state, command, event, error),
) -> Result(List(Envelope(event)), KumaError)

/// Erases the entity for good (its key is destroyed); the number of events deleted.
@external(erlang, "Elixir.Kuma.Gleam", "erase")
pub fn erase(
  entity: Entity(state, command, event, error),
) -> Result(Int, KumaError)
