defmodule Kuma.Projection.Failure do
  @moduledoc false
  # What a projection does when an event fails: retry it with backoff, park it, or stop.
  # A pure decision over data (the event, the previous failure, the projection's policy),
  # so it is tested without SQLite, timers or processes; Kuma.Projection.Runner carries
  # the decision out.

  @max_backoff 30_000

  @enforce_keys [:shard, :position, :entity_id, :seq, :type, :error, :attempts]
  defstruct [:hash | @enforce_keys]

  @typedoc """
  The event a projection is stuck on. `entity_id` and `type` become nil when the entity is
  erased meanwhile (`forgotten/2`): nothing of it may be kept, and there is nothing left
  to park.
  """
  @type t :: %__MODULE__{
          shard: non_neg_integer(),
          position: pos_integer(),
          entity_id: binary() | nil,
          seq: pos_integer(),
          type: String.t() | nil,
          hash: binary() | nil,
          error: term(),
          attempts: pos_integer()
        }

  @type policy :: %{max_retries: non_neg_integer(), retry_backoff: pos_integer(), on_error: :park | :stop}
  @type decision :: {:retry, backoff_ms :: pos_integer(), t()} | {:park, t()} | {:stop, t()}

  @doc """
  The failure of the event at `shard`/`position` with `error`, counting the attempts made
  on the same event before (`previous`), and what to do about it.
  """
  @spec decide(t() | nil, map(), term(), policy()) :: decision()
  def decide(previous, event, error, policy) do
    attempts =
      case previous do
        %__MODULE__{shard: shard, position: pos, attempts: n} when shard == event.shard and pos == event.position ->
          n + 1

        _ ->
          1
      end

    failure = %__MODULE__{
      shard: event.shard,
      position: event.position,
      entity_id: event.entity_id,
      seq: event.seq,
      type: event.type,
      hash: Map.get(event, :hash),
      error: error,
      attempts: attempts
    }

    cond do
      attempts <= policy.max_retries -> {:retry, backoff(policy.retry_backoff, attempts), failure}
      policy.on_error == :park -> {:park, failure}
      true -> {:stop, failure}
    end
  end

  @doc "Exponential backoff from `base` ms, at most 30 s."
  @spec backoff(pos_integer(), pos_integer()) :: pos_integer()
  def backoff(base, attempts), do: min(base * Integer.pow(2, attempts - 1), @max_backoff)

  @doc "The failure once its entity is erased: it keeps no id and no type."
  @spec forgotten(t() | nil, binary()) :: t() | nil
  def forgotten(%__MODULE__{entity_id: id} = failure, id),
    do: %{failure | entity_id: nil, type: nil, error: :entity_erased}

  def forgotten(failure, _entity_id), do: failure

  @doc "What `Kuma.Projection.status/1` shows of a failure."
  @spec public(t() | nil) :: map() | nil
  def public(nil), do: nil
  def public(%__MODULE__{} = f), do: Map.take(f, [:shard, :position, :entity_id, :seq, :attempts, :error])
  def public(%{error: error}), do: %{error: error}
end
