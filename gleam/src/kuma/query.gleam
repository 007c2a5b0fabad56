//// Queries across entities.

import kuma.{type KumaError, type Store}
import kuma/entity.{type Envelope}

/// Events of one type across the store (a Gleam record `UserCreated(..)` has the type
/// `"user_created"`), at most `limit` of them, oldest first within each shard.
@external(erlang, "Elixir.Kuma.Gleam", "by_type")
pub fn by_type(
  store: Store,
  event_type event_type: String,
  limit limit: Int,
) -> Result(List(Envelope(event)), KumaError)
