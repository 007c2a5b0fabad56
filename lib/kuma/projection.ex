defmodule Kuma.Projection do
  @moduledoc """
  Projections turn the events of many entities into something else: a read model, a cache,
  messages to another system. Entities are consistent inside themselves; everything across
  entities goes through projections, eventually consistent by design and rebuildable at
  any time from the events.

      defmodule MyApp.Signups do
        @behaviour Kuma.Projection

        @impl true
        def init(_args), do: {:ok, 0}

        @impl true
        def handle_event(%Kuma.Envelope{type: "UserSignedUp"}, count), do: {:ok, count + 1}
      end

      {:ok, _pid} = Kuma.Projection.start(store, MyApp.Signups, name: :signups, types: ["UserSignedUp"])

  For rows in SQL tables that you query, use `Kuma.ReadModel`, which builds on this.

  ## How events arrive

  A projection reads every shard from its checkpoint in position order (catch-up), then
  sleeps until the store tells it of a commit and reads again (live). Both are the same
  loop over storage, so nothing is lost in a switch between them. Positions are handed
  out per shard at commit and an event becomes readable only after every event before it
  in its shard, so a projection can never pass over an event that commits late (the bug
  of tailing by timestamp or by a sequence handed out before commit).

  Each `handle_event/2` gets a `Kuma.Envelope` (entity id, seq, type, timestamp, metadata,
  data, and its position: shard and position in that shard). Order is guaranteed within
  one entity and one shard; there is no order between shards.

  ## Delivery and checkpoints

  After each batch the projection's checkpoint (a `Kuma.Position`) is written to its own
  SQLite file, `<data_dir>/projections/<name>.sqlite`. After a crash it resumes from there,
  so an event may be handed to `handle_event/2` again (at-least-once); `{entity_id, seq}` is
  the key to make its effects idempotent. `Kuma.ReadModel` commits its rows and checkpoint
  in one transaction, which makes it exactly-once in effect.

  With `checkpoint: :memory` a projection starts from the first event at every start:
  right for projections whose state lives only in memory (the default `:durable` suits
  projections whose effects outlive the process).

  ## Failures

  When `handle_event/2` raises or returns something else than `{:ok, state}`, the event is
  retried `:max_retries` times (default 3) with exponential backoff from `:retry_backoff`
  ms (default 100), each failure logged with the entity id and seq. Then, by `:on_error`:

  * `:park` (default) - the event is recorded as parked (see `parked/1`) and the
    projection goes on with the next one;
  * `:stop` - the projection stops where it is (status `:stopped`) until an operator calls
    `skip/1`, `reset/2` or `rebuild/1`.

  User code never crashes the projection's process, so there is no restart loop. If the
  process dies anyway (killed), its supervisor restarts it from the last checkpoint.

  ## Erasure

  `Kuma.delete/2` calls `forget/2` (if defined) on every projection of the store and waits
  for it; parked records of the entity are deleted too. Every projection whose process runs
  at that moment is told, also one halted on an error (status `:stopped`). One that was
  stopped with `stop/1`, or not started yet, is not: its output keeps the entity's rows
  until `rebuild/1`, which replays without them (the erased events are gone from the
  shards). Rebuild such a projection when you start it again.

  ## Options of `start/3`

  * `:name` - an atom naming the projection (default: the module); unique in the VM
  * `:args` - passed to `init/1` (default `[]`)
  * `:types` - only events of these types (strings, or struct modules); default all
  * `:scope` - only events with this scope (`"org:acme"`) or scope prefix (`"org:acme/*"`)
  * `:id_prefix` - only events of entities whose id starts with this
  * `:on_error`, `:max_retries`, `:retry_backoff` - see "Failures"
  * `:batch_size` - events read per batch (default 500)
  * `:checkpoint` - `:durable` (default) or `:memory`
  * `:path` - the projection's file (default under `<data_dir>/projections/`)

  Filters may also come from an optional `filter/0` callback returning the same keys.
  Projections can also be started with the store: `Kuma.start(projections: [Module, {Module, opts}])`.
  """

  alias Kuma.{Position, Store}

  @doc "Called when the projection starts (and on `rebuild/1`); returns its initial state."
  @callback init(args :: term()) :: {:ok, state :: term()}

  @doc "Handles one event; returns the new state."
  @callback handle_event(Kuma.Envelope.t(), state :: term()) :: {:ok, state :: term()}

  @doc "Drops everything derived from an erased entity."
  @callback forget(entity_id :: binary(), state :: term()) :: {:ok, state :: term()}

  @doc "Default filter options (`:types`, `:scope`, `:id_prefix`)."
  @callback filter() :: keyword()

  @optional_callbacks forget: 2, filter: 0

  @type name :: atom()

  @start_keys [
    :name,
    :args,
    :types,
    :scope,
    :id_prefix,
    :on_error,
    :max_retries,
    :retry_backoff,
    :batch_size,
    :checkpoint,
    :path
  ]

  @doc """
  Starts a projection of `store` under the store's supervisor (see the moduledoc for the
  options). Returns `{:error, {:already_started, name}}` if one with that name runs.
  """
  @spec start(Kuma.store(), module(), keyword()) :: {:ok, pid()} | {:error, term()}
  def start(store, module, opts \\ []) do
    with {:ok, s} <- Store.lookup(store),
         {:ok, spec} <- spec(s, :projection, module, opts) do
      start_spec(s, spec)
    end
  end

  @doc false
  @spec start_spec(Store.t(), map()) :: {:ok, pid()} | {:error, term()}
  def start_spec(s, spec) do
    case whereis(spec.name) do
      nil ->
        sup = Store.via(s.name, :projections)

        case DynamicSupervisor.start_child(sup, Kuma.Projection.Runner.child_spec(spec)) do
          {:ok, pid} -> {:ok, pid}
          {:error, {:already_started, _}} -> {:error, {:already_started, spec.name}}
          {:error, {reason, {:child, _, _, _, _, _, _, _}}} -> {:error, reason}
          {:error, reason} -> {:error, reason}
        end

      _pid ->
        {:error, {:already_started, spec.name}}
    end
  catch
    :exit, _ -> {:error, {:no_store, s.name}}
  end

  @doc false
  # Validates options into the runner's spec.
  @spec spec(Store.t() | map(), :projection | :read_model, module(), keyword()) :: {:ok, map()} | {:error, term()}
  def spec(s, kind, module, opts) do
    with :ok <- Store.Config.check_keys(opts, @start_keys),
         :ok <- check_module(kind, module),
         defaults = if(function_exported?(module, :filter, 0), do: module.filter(), else: []),
         {:ok, filter} <- filter(Keyword.merge(defaults, Keyword.take(opts, [:types, :scope, :id_prefix]))),
         name = Keyword.get(opts, :name, module),
         :ok <- check(:name, name, is_atom(name) and name not in [nil, true, false]),
         on_error = Keyword.get(opts, :on_error, :park),
         :ok <- check(:on_error, on_error, on_error in [:park, :stop]),
         max_retries = Keyword.get(opts, :max_retries, 3),
         :ok <- check(:max_retries, max_retries, is_integer(max_retries) and max_retries >= 0),
         backoff = Keyword.get(opts, :retry_backoff, 100),
         :ok <- check(:retry_backoff, backoff, is_integer(backoff) and backoff > 0),
         batch = Keyword.get(opts, :batch_size, 500),
         :ok <- check(:batch_size, batch, is_integer(batch) and batch in 1..100_000),
         checkpoint = Keyword.get(opts, :checkpoint, :durable),
         :ok <- check(:checkpoint, checkpoint, checkpoint in [:durable, :memory]) do
      path = Keyword.get(opts, :path) || Path.join([s.data_dir, "projections", file_name(name) <> ".sqlite"])

      {:ok,
       %{
         name: name,
         store: s.name,
         kind: kind,
         module: module,
         args: Keyword.get(opts, :args, []),
         filter: filter,
         on_error: on_error,
         max_retries: max_retries,
         retry_backoff: backoff,
         batch_size: batch,
         checkpoint_mode: checkpoint,
         path: Path.expand(to_string(path)),
         restart: :permanent
       }}
    end
  end

  defp check_module(kind, module) do
    needed = if kind == :read_model, do: [schema: 0, handle_event: 1], else: [init: 1, handle_event: 2]

    cond do
      not is_atom(module) or not Code.ensure_loaded?(module) ->
        {:error, {:invalid, :module, "#{inspect(module)} is not a loaded module"}}

      missing = Enum.find(needed, fn {f, a} -> not function_exported?(module, f, a) end) ->
        {f, a} = missing
        {:error, {:invalid, :module, "#{inspect(module)} does not define #{f}/#{a}"}}

      true ->
        :ok
    end
  end

  defp check(_key, _value, true), do: :ok
  defp check(key, value, false), do: {:error, {:invalid, key, "not a valid value: #{inspect(value)}"}}

  defp file_name(name) do
    name |> Atom.to_string() |> String.replace_prefix("Elixir.", "") |> String.replace(~r/[^A-Za-z0-9_.-]/, "_")
  end

  @doc false
  # Filter options -> %{types, scope, id_prefix, entity_id} in the form Kuma.Native.query_shard takes.
  @spec filter(keyword()) :: {:ok, map()} | {:error, term()}
  def filter(opts) do
    with {:ok, types} <- types(Keyword.get(opts, :types, Keyword.get(opts, :type))),
         {:ok, scope} <- scope(Keyword.get(opts, :scope)),
         {:ok, id_prefix} <- binary_opt(:id_prefix, Keyword.get(opts, :id_prefix)),
         {:ok, entity_id} <- binary_opt(:entity_id, Keyword.get(opts, :entity_id)) do
      {:ok, %{types: types, scope: scope, id_prefix: entity_id || id_prefix, entity_id: entity_id}}
    end
  end

  defp types(nil), do: {:ok, []}
  defp types(list) when is_list(list) and length(list) <= 64, do: collect(list, &type/1)
  defp types(list) when is_list(list), do: {:error, {:too_large, :types, length(list), 64}}
  defp types(one), do: types([one])

  defp type(t) when is_binary(t) and t != "", do: {:ok, t}

  defp type(t) when is_atom(t) and t not in [nil, true, false], do: {:ok, Kuma.Codec.module_type(t)}

  defp type(t), do: {:error, {:invalid, :types, "a type is a non-empty string or an atom, got: #{inspect(t)}"}}

  @doc false
  # Maps `fun` (returning {:ok, value} or an error) over `list`: {:ok, values} in order, or
  # the first error.
  @spec collect(list(), (term() -> {:ok, term()} | term())) :: {:ok, list()} | term()
  def collect(list, fun) do
    Enum.reduce_while(list, {:ok, []}, fn x, {:ok, acc} ->
      case fun.(x) do
        {:ok, v} -> {:cont, {:ok, [v | acc]}}
        error -> {:halt, error}
      end
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      error -> error
    end
  end

  defp scope(nil), do: {:ok, nil}

  defp scope(scope) when is_binary(scope) and scope != "" do
    case String.split_at(scope, -1) do
      {prefix, "*"} -> {:ok, {:prefix, prefix}}
      _ -> {:ok, {:exact, scope}}
    end
  end

  defp scope(other),
    do: {:error, {:invalid, :scope, "must be a non-empty string (\"org:acme/*\" for a prefix), got: #{inspect(other)}"}}

  defp binary_opt(_key, nil), do: {:ok, nil}
  defp binary_opt(_key, b) when is_binary(b) and b != "", do: {:ok, b}
  defp binary_opt(key, other), do: {:error, {:invalid, key, "must be a non-empty binary, got: #{inspect(other)}"}}

  # -- operating -------------------------------------------------------------------------------

  @doc """
  The state of a projection: `:status` (`:live`, `:catching_up`, `:retrying` or `:stopped`),
  `:position` (its checkpoint), `:heads` (the store's last commits it knows of), `:lag`
  (positions behind, summed over shards), `:handled` (events since start), `:parked`
  (count) and `:failure` (the event it is stuck on, if any).
  """
  @spec status(name()) :: {:ok, map()} | {:error, term()}
  def status(name), do: call(name, :status, 30_000, &{:ok, &1})

  @doc """
  Waits until the projection has handled everything up to `token` (a `Kuma.Position`, as
  returned by appends with `return: :token`). Returns `:ok` or `{:error, :timeout}`.
  """
  @spec wait_for(name(), Position.t(), timeout()) :: :ok | {:error, term()}
  def wait_for(name, token, timeout \\ 5_000) do
    if Position.valid?(token),
      do: call(name, {:wait_for, token, timeout}, :infinity, & &1),
      else: {:error, {:invalid, :token, "must be a map of shard => position"}}
  end

  @doc """
  Drops the projection's checkpoint and output and replays every event from the start,
  while writes go on: a read model's file is deleted and its schema created again; a
  projection's `init/1` is called again (its outside effects are its own to undo). Queries
  meanwhile see the read model filling up; `wait_for/3` tells when it caught up.
  """
  @spec rebuild(name()) :: :ok | {:error, term()}
  def rebuild(name), do: call(name, :rebuild, 60_000, & &1)

  @doc """
  Moves the checkpoint to `position` (a `Kuma.Position`; shards not named go to 0, so `%{}`
  replays everything) and resumes a stopped projection. Output is kept: events after the
  position are handled again.
  """
  @spec reset(name(), Position.t()) :: :ok | {:error, term()}
  def reset(name, position) do
    if Position.valid?(position),
      do: call(name, {:reset, position}, 30_000, & &1),
      else: {:error, {:invalid, :position, "must be a map of shard => position"}}
  end

  @doc """
  Skips the event the projection is stuck on (retrying, or stopped by `on_error: :stop`): it
  is recorded as parked and the projection resumes after it. Returns what was skipped, or
  `{:error, :nothing_to_skip}`.
  """
  @spec skip(name()) :: {:ok, map()} | {:error, term()}
  def skip(name), do: call(name, :skip, 30_000, & &1)

  @doc "The parked events: shard, position, entity id, seq, type, error, attempts, when."
  @spec parked(name()) :: {:ok, [map()]} | {:error, term()}
  def parked(name), do: call(name, :parked, 30_000, & &1)

  @doc """
  Stops a projection (its checkpoint and output stay); start it again with `start/3`. A
  projection configured with the store (`projections:`) stays stopped until the store
  restarts.
  """
  @spec stop(name()) :: :ok | {:error, term()}
  def stop(name) do
    case Registry.lookup(Kuma.Registry, {:projection, name}) do
      [{pid, %{store: store}}] ->
        # Through its supervisor: a permanent child stopped any other way is restarted.
        case DynamicSupervisor.terminate_child(Store.via(store, :projections), pid) do
          :ok ->
            :ok

          {:error, :not_found} ->
            Supervisor.terminate_child(Store.via(store, :projection_sup), {Kuma.Projection.Runner, name})
        end

      _ ->
        {:error, {:unknown_projection, name}}
    end
  catch
    :exit, _ -> {:error, {:unknown_projection, name}}
  end

  @doc false
  def whereis(name) do
    case Registry.lookup(Kuma.Registry, {:projection, name}) do
      [{pid, _}] -> pid
      [] -> nil
    end
  end

  defp call(name, message, timeout, wrap) do
    case whereis(name) do
      nil -> {:error, {:unknown_projection, name}}
      pid -> wrap.(GenServer.call(pid, message, timeout))
    end
  catch
    :exit, {:timeout, _} -> {:error, :timeout}
    :exit, _ -> {:error, {:unknown_projection, name}}
  end
end
