//// Projections: a function called for every event of the store, in commit order per
//// shard, from the first, then for every new one as it commits.

import kuma.{type KumaError, type Store}
import kuma/entity.{type Envelope}

/// Starts a projection named `name` that calls `handler` for every event. Its checkpoint
/// is kept in memory: it starts from the first event each time it starts.
@external(erlang, "Elixir.Kuma.Gleam", "start_projection")
pub fn start(
  store: Store,
  name name: String,
  handler handler: fn(Envelope(event)) -> a,
) -> Result(Nil, KumaError)

/// Stops the projection `name`.
@external(erlang, "Elixir.Kuma.Gleam", "stop_projection")
pub fn stop(name: String) -> Result(Nil, KumaError)

/// How many positions the projection is behind the store's commits.
@external(erlang, "Elixir.Kuma.Gleam", "projection_lag")
pub fn lag(name: String) -> Result(Int, KumaError)
