defmodule Kuma.Gleam do
  @moduledoc """
  The one place where Kuma's Gleam package (`gleam/`) meets Kuma: every `@external` of
  the Gleam modules calls a function here, which turns Gleam's values into Kuma's
  arguments and Kuma's answers into the Gleam types. What needs no conversion is passed
  as it is: a Gleam `Result` is `{:ok, _}` / `{:error, _}`, a record `Shards(16)` is the
  keyword entry `{:shards, 16}`, a constructor without fields is an atom.

  The shapes on the Gleam side (gleam/src/kuma.gleam):

  * `Store` is `{:store, name}`
  * `Entity(state, command, event, error)` is `{:entity, store, aggregate_module, id}`
  * `KumaError` is one of the tuples `error/1` makes (`{:wrong_expected_seq, 1, 2}`,
    `:entity_erased`, `{:invalid, "entity_id", "must not be empty"}`, `{:other, text}`, ...)
  * `ExecuteError(e)` is `{:rejected, e}` (the aggregate refused) or `{:failed, kuma_error}`
  * `Envelope(event)` is `{:envelope, entity_id, seq, position, shard, event_type, timestamp, data}`

  Tested directly by ExUnit (test/kuma/gleam_test.exs), with or without a Gleam compiler.
  """

  alias Kuma.Entity

  @typedoc "A Gleam store handle."
  @type store :: {:store, atom()}

  @typedoc "A Gleam entity handle."
  @type entity :: {:entity, store(), module(), binary()}

  # -- the store ---------------------------------------------------------------------------

  @doc "`kuma.start(data_dir, shards:)`: a store named after its data dir."
  @spec start(binary(), integer()) :: {:ok, store()} | {:error, term()}
  def start(data_dir, shards), do: start_with([{:data_dir, data_dir}, {:shards, shards}])

  @doc """
  `kuma.start_with(options)`: options are Gleam records (`DataDir(String)`, `Shards(Int)`,
  `Name(String)`, `Sync(Normal | Full)`, `Aggregates(List(String))` (Erlang module names such
  as `"bank@account"`), `MasterKeyFile(String)`, `Encryption(Bool)`, `Http(port: Int)`).
  """
  @spec start_with(list()) :: {:ok, store()} | {:error, term()}
  def start_with(options) when is_list(options) do
    opts = Enum.map(options, &option/1)
    name = Keyword.get_lazy(opts, :name, fn -> default_name(Keyword.get(opts, :data_dir)) end)

    case Kuma.start(Keyword.put(opts, :name, name)) do
      {:ok, _} -> {:ok, {:store, name}}
      {:error, reason} -> {:error, error(reason)}
    end
  rescue
    e in ArgumentError -> {:error, {:invalid, "options", Exception.message(e)}}
  end

  defp option({:name, name}) when is_binary(name), do: {:name, String.to_atom(name)}
  defp option({:aggregates, modules}) when is_list(modules), do: {:aggregates, Enum.map(modules, &module/1)}
  defp option({:http, port}) when is_integer(port), do: {:http, [port: port]}
  defp option({key, value}) when is_atom(key), do: {key, value}
  defp option(other), do: raise(ArgumentError, "not a start option: #{inspect(other)}")

  # A store started from Gleam without Name(...) is named after its data dir.
  defp default_name(nil), do: :kuma
  defp default_name(dir), do: String.to_atom("kuma:" <> Path.expand(to_string(dir)))

  @doc "`kuma.stop(store)`."
  @spec stop(store()) :: {:ok, nil} | {:error, term()}
  def stop({:store, name}), do: nil_result(Kuma.stop(name))

  # -- entities -------------------------------------------------------------------------------

  @doc "`entity.spawn(store, id:)`: an entity whose state is its latest event."
  @spec spawn(store(), binary()) :: entity()
  def spawn(store, id), do: {:entity, store, Kuma.Aggregate.Latest, id}

  @doc "`entity.of(store, aggregate, id:)`: an entity of a Gleam (or any) aggregate module."
  @spec of(store(), binary(), binary()) :: entity()
  def of(store, aggregate, id), do: {:entity, store, module(aggregate), id}

  @doc "`entity.append(entity, event)` and `entity.append_many(entity, events)`: `{:ok, last_seq}`."
  @spec append(entity(), [term()]) :: {:ok, non_neg_integer()} | {:error, term()}
  def append(e, events) when is_list(events), do: result(Kuma.append(handle(e), events))

  @doc "`entity.execute(entity, command)`: `{:ok, last_seq}`, `{:error, {:rejected, reason}}` or `{:error, {:failed, kuma_error}}`."
  @spec execute(entity(), term()) :: {:ok, non_neg_integer()} | {:error, {:rejected, term()} | {:failed, term()}}
  def execute(e, command) do
    case Kuma.execute(handle(e), command) do
      {:ok, seq} -> {:ok, seq}
      {:error, reason} -> {:error, if(kuma_reason?(reason), do: {:failed, error(reason)}, else: {:rejected, reason})}
    end
  end

  @doc "`entity.read(entity)`: the state; an entity of the latest event with none yet is `{:error, :no_events}`."
  @spec read(entity()) :: {:ok, term()} | {:error, term()}
  def read({:entity, _, Kuma.Aggregate.Latest, _} = e) do
    case Kuma.fetch(handle(e)) do
      {:ok, nil} -> {:error, :no_events}
      other -> result(other)
    end
  end

  def read(e), do: result(Kuma.fetch(handle(e)))

  @doc "`entity.history(entity)`: every event, as `Envelope` records."
  @spec history(entity()) :: {:ok, [tuple()]} | {:error, term()}
  def history({:entity, {:store, store}, _, id}) do
    with {:ok, events} <- result(Kuma.events(store, id)), do: {:ok, Enum.map(events, &envelope/1)}
  end

  @doc "`entity.erase(entity)`: erases it for good; `{:ok, events_deleted}`."
  @spec erase(entity()) :: {:ok, non_neg_integer()} | {:error, term()}
  def erase({:entity, {:store, store}, _, id}) do
    with {:ok, %{events_deleted: n}} <- result(Kuma.delete(store, id)), do: {:ok, n}
  end

  defp handle({:entity, {:store, store}, aggregate, id}), do: Entity.new(store, aggregate, id)

  # -- queries, projections, sagas -----------------------------------------------------------

  @doc "`query.by_type(store, event_type:, limit:)`: events of that type across the store."
  @spec by_type(store(), binary(), integer()) :: {:ok, [tuple()]} | {:error, term()}
  def by_type({:store, store}, type, limit) do
    with {:ok, events} <- result(Kuma.query(store, types: [type], limit: limit)),
         do: {:ok, Enum.map(events, &envelope/1)}
  end

  @doc """
  `projection.start(store, name:, handler:)`: a projection that calls the Gleam function
  `handler(envelope)` for every event, in order, from the first; its checkpoint is kept in
  memory (it starts from the beginning each time).
  """
  @spec start_projection(store(), binary(), (tuple() -> term())) :: {:ok, nil} | {:error, term()}
  def start_projection({:store, store}, name, handler) when is_function(handler, 1) do
    opts = [name: String.to_atom(name), args: handler, checkpoint: :memory]
    with {:ok, _pid} <- result(Kuma.Projection.start(store, Kuma.Gleam.Projection, opts)), do: {:ok, nil}
  end

  @doc "`projection.stop(name)`."
  @spec stop_projection(binary()) :: {:ok, nil} | {:error, term()}
  def stop_projection(name), do: nil_result(Kuma.Projection.stop(String.to_atom(name)))

  @doc "`projection.lag(name)`: positions the projection is behind."
  @spec projection_lag(binary()) :: {:ok, non_neg_integer()} | {:error, term()}
  def projection_lag(name) do
    with {:ok, %{lag: lag}} <- result(Kuma.Projection.status(String.to_atom(name))), do: {:ok, lag}
  end

  @doc "`saga.run(store, saga:, id:, args:)`: `{:ok, :completed}` or `{:ok, {:compensated, step, reason}}`."
  @spec run_saga(store(), binary(), binary(), term()) :: {:ok, term()} | {:error, term()}
  def run_saga({:store, store}, saga, id, args), do: result(Kuma.Saga.run(store, module(saga), id, args))

  # -- conversions -------------------------------------------------------------------------

  @doc false
  # A Kuma.Envelope as the Gleam record Envelope.
  def envelope(%Kuma.Envelope{} = e),
    do: {:envelope, e.entity_id, e.seq, e.position, e.shard, e.type, e.timestamp, e.data}

  # An Erlang module name given by Gleam ("bank@account").
  defp module(name) when is_binary(name), do: String.to_atom(name)
  defp module(name) when is_atom(name), do: name

  defp result({:ok, value}), do: {:ok, value}
  defp result(:ok), do: {:ok, nil}
  defp result({:error, reason}), do: {:error, error(reason)}

  defp nil_result(:ok), do: {:ok, nil}
  defp nil_result(other), do: result(other)

  @doc """
  A Kuma error reason as the Gleam `KumaError`: the reasons a caller can act on keep their
  shape (atoms, ints and strings); the others become `{:other, sentence}`.
  """
  @spec error(term()) :: term()
  def error({:wrong_expected_seq, expected, actual}), do: {:wrong_expected_seq, expected, actual}
  def error(:entity_erased), do: :entity_erased
  def error(:store_closed), do: :store_closed
  def error(:timeout), do: :timeout
  def error(:no_events), do: :no_events
  def error({:no_store, name}), do: {:no_store, to_string(name)}
  def error({:invalid, what, why}), do: {:invalid, to_string(what), why}
  def error({:unknown_option, key}), do: {:invalid, to_string(key), "unknown option"}
  def error({:too_large, what, size, max}), do: {:too_large, to_string(what), size, max}
  def error({:corrupt, seq, why}), do: {:corrupt, seq, why}
  def error({:data_dir_locked, path}), do: {:data_dir_locked, path}
  def error({:already_started, name}), do: {:already_started, to_string(name)}
  def error(reason), do: {:other, Kuma.format_error(reason)}

  # Whether an execute's error came from Kuma rather than the aggregate's handle/2.
  @kuma_reasons [
    :wrong_expected_seq,
    :entity_erased,
    :store_closed,
    :timeout,
    :no_store,
    :invalid,
    :unknown_option,
    :too_large,
    :corrupt,
    :decrypt_failed,
    :key_missing,
    :storage,
    :panic,
    :unknown_aggregate,
    :aggregate_mismatch,
    :no_handle,
    :user_code_crashed,
    :replay_failed,
    :init_failed,
    :entity_down,
    :entity_start_failed,
    :subject_erased,
    :outcome_unknown,
    :not_leader,
    :no_leader,
    :unreachable,
    :not_supported_in_cluster
  ]
  defp kuma_reason?(reason) when is_atom(reason), do: reason in @kuma_reasons
  defp kuma_reason?(reason) when is_tuple(reason) and tuple_size(reason) > 0, do: elem(reason, 0) in @kuma_reasons
  defp kuma_reason?(_reason), do: false
end

defmodule Kuma.Gleam.Projection do
  @moduledoc false
  # A projection whose handler is a Gleam function of one Envelope (Kuma.Gleam.start_projection/3).
  @behaviour Kuma.Projection

  @impl true
  def init(handler), do: {:ok, handler}

  @impl true
  def handle_event(envelope, handler) do
    handler.(Kuma.Gleam.envelope(envelope))
    {:ok, handler}
  end
end
