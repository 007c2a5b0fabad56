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
  alias Kuma.Projection.Spec

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

  @doc """
  Starts a projection of `store` under the store's supervisor (see the moduledoc for the
  options). Returns `{:error, {:already_started, name}}` if one with that name runs.
  """
  @spec start(Kuma.store(), module(), keyword()) :: {:ok, pid()} | {:error, term()}
  def start(store, module, opts \\ []) do
    with {:ok, s} <- Store.lookup(store),
         {:ok, spec} <- Spec.new(s, :projection, module, opts) do
      start_spec(s, spec, opts)
    end
  end

  @doc false
  # Starts a projection or read model from its spec and the options it was made from (one
  # name runs once in the VM; in cluster mode, once in the cluster: Kuma.Cluster.Projections).
  @spec start_spec(Store.t(), Spec.t(), keyword()) :: {:ok, pid()} | {:error, term()}
  def start_spec(%Store{cluster: nil} = s, spec, _opts) do
    case whereis(spec.name) do
      nil -> Kuma.Projection.Supervisor.start_runner(s, spec)
      _pid -> {:error, {:already_started, spec.name}}
    end
  end

  def start_spec(s, spec, opts), do: Kuma.Cluster.Projections.start(s, spec, opts)

  # -- operating -------------------------------------------------------------------------------

  @doc """
  The state of a projection: `:status` (`:live`, `:catching_up`, `:retrying` or `:stopped`),
  `:position` (its checkpoint), `:heads` (the store's last commits it knows of), `:lag`
  (positions behind, summed over shards), `:handled` (events since start), `:parked`
  (count) and `:failure` (the event it is stuck on, if any). `{:error, :timeout}` if the
  projection does not answer within `timeout` ms (default 30,000).
  """
  @spec status(name(), timeout()) :: {:ok, map()} | {:error, term()}
  def status(name, timeout \\ 30_000), do: call(name, :status, timeout, &{:ok, &1})

  @doc """
  Waits until the projection has handled everything up to `token` (a `Kuma.Position`, as
  returned by appends with `return: :token`). Returns `:ok` or `{:error, :timeout}`.

  `name` may also be a subscription (the pid `Kuma.subscribe/2` returned): then `:ok` means
  every event up to `token` that the subscription matches has been sent to its subscriber
  (is in the subscriber's mailbox), so a writer can append, wait, and know its subscriber
  has the event. A subscription that has ended gives `{:error, {:unknown_projection, pid}}`.
  """
  @spec wait_for(name() | pid(), Position.t(), timeout()) :: :ok | {:error, term()}
  def wait_for(name, token, timeout \\ 5_000) do
    cond do
      not Position.valid?(token) -> {:error, {:invalid, :token, "must be a map of shard => position"}}
      Kuma.Validate.timeout(timeout: timeout) != :ok -> Kuma.Validate.timeout(timeout: timeout)
      is_pid(name) -> subscription_call(name, {:wait_for, token, timeout})
      true -> call(name, {:wait_for, token, timeout}, :infinity, & &1)
    end
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
    case {Registry.lookup(Kuma.Registry, {:projection_home, name}), Registry.lookup(Kuma.Registry, {:projection, name})} do
      {[{_, %{store: store}}], _} -> with {:ok, s} <- Store.lookup(store), do: Kuma.Cluster.Projections.stop(s, name)
      {_, [{pid, %{store: store}}]} -> Kuma.Projection.Supervisor.stop_runner(store, name, pid)
      _ -> {:error, {:unknown_projection, name}}
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

  # A call to the projection's runner: here, or (cluster mode) on the node that runs it.
  defp call(name, message, timeout, wrap) do
    case {whereis(name), Kuma.Cluster.Projections.home(name)} do
      {pid, _} when is_pid(pid) -> here(name, message, timeout)
      {nil, {:ok, node}} when node != node() -> there(node, name, message, timeout)
      _ -> {:error, {:unknown_projection, name}}
    end
    |> case do
      {:reply, reply} -> wrap.(reply)
      {:error, reason} -> {:error, reason}
    end
  end

  # A subscription is not registered by name: it is called by its pid, once that is known
  # to be a runner's (a call to any other process could wait forever).
  defp subscription_call(pid, message) do
    if node(pid) != node() or match?({Kuma.Projection.Runner, :init, _}, :proc_lib.initial_call(pid)),
      do: GenServer.call(pid, message, :infinity),
      else: {:error, {:unknown_projection, pid}}
  catch
    :exit, _ -> {:error, {:unknown_projection, pid}}
  end

  @doc false
  # Runs on the node of the projection's runner.
  def here(name, message, timeout) do
    case whereis(name) do
      nil -> {:error, {:unknown_projection, name}}
      pid -> {:reply, GenServer.call(pid, message, timeout)}
    end
  catch
    :exit, {:timeout, _} -> {:error, :timeout}
    :exit, _ -> {:error, {:unknown_projection, name}}
  end

  defp there(node, name, message, timeout) do
    erpc_timeout = if timeout == :infinity, do: :infinity, else: timeout + 5_000
    :erpc.call(node, __MODULE__, :here, [name, message, timeout], erpc_timeout)
  catch
    :error, {:erpc, :timeout} -> {:error, :timeout}
    _, _ -> {:error, {:unreachable, node, :projection}}
  end
end
