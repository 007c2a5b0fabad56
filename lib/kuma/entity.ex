defmodule Kuma.Entity do
  @moduledoc """
  A handle to one entity: a store, an aggregate and an id. Creating a handle starts
  nothing; the entity's process (`Kuma.Entity.Server`) starts on first use, loads its state
  from the latest snapshot plus the events after it, and is passivated when idle.

      alice = Kuma.entity(:bank, Bank.Account, "account:alice")
      {:ok, 1} = Kuma.execute(alice, {:deposit, 50})
      %Bank.Account{balance: 50} = Kuma.read(alice)

  Use the functions on `Kuma` (`Kuma.execute/3`, `Kuma.read/1`, `Kuma.fetch/1`,
  `Kuma.append/3`, `Kuma.read_at/2`, `Kuma.history/2`, `Kuma.passivate/1`,
  `Kuma.entity_info/1`); they delegate here.

  ## Reads are served from memory

  A live entity publishes its current state and seq in its store's entity table (ETS).
  `read/1` and `fetch/1` look there: no message to the entity, no NIF call, no disk. Only a
  cold entity is loaded (once). A read also marks the entity as recently used, at most once
  per reaper tick, so a read-mostly entity is not passivated while it is being read.

  ## Consistency

  Within one entity, every read sees a state that includes every write acknowledged
  before it started (the state is published before the write is acknowledged). Writes are
  serialized by the entity's process. A store-level `Kuma.append/4` to an id whose entity
  is live is routed through that process; to a cold entity it goes straight to storage and
  the entity sees it when it loads. If such a write races the entity's activation, the
  entity notices at its next write (the stream's seq is not what it expected), reloads
  and decides again.

  ## Passivation

  An entity not used for `:idle_timeout` (store option, default 15 minutes) stops, and
  when more than `:max_live_entities` (default 100,000) are live, the least recently used
  stop. Both are checked by `Kuma.Entity.Reaper` about once a second. The next use
  reloads the entity transparently.
  """

  alias Kuma.{EventLog, Native, Store, Validate}
  alias Kuma.Cluster.Route
  alias Kuma.Entity.{Loader, Server}

  @enforce_keys [:store, :aggregate, :id]
  defstruct @enforce_keys

  @type t :: %__MODULE__{store: Store.name(), aggregate: module(), id: binary()}

  @doc """
  A handle; starts nothing. Raises `ArgumentError` if the id is not a non-empty binary or
  the aggregate not an atom (programmer errors). An aggregate the store was not started
  with is reported by the first call (`{:error, {:unknown_aggregate, module}}`).
  """
  @spec new(Store.t() | Store.name(), module(), binary()) :: t()
  def new(store, aggregate, id) do
    name =
      case store do
        %Store{name: name} -> name
        name when is_atom(name) -> name
        other -> raise ArgumentError, "expected a Kuma.Store or a store name, got: #{inspect(other)}"
      end

    Validate.entity_id!(id)
    if not is_atom(aggregate), do: raise(ArgumentError, "aggregate must be a module, got: #{inspect(aggregate)}")
    %__MODULE__{store: name, aggregate: aggregate, id: id}
  end

  @doc "The current state, from memory (see moduledoc)."
  @spec fetch(t()) :: {:ok, term()} | {:error, term()}
  def fetch(%__MODULE__{} = e) do
    with {:ok, s} <- store(e) do
      case s.cluster do
        nil -> fetch_here(s, e)
        _ -> routed(s, e, {:fetch, []}, EventLog.default_timeout(), [], fn -> fetch_here(s, e) end)
      end
    end
  end

  defp fetch_here(s, e) do
    case :ets.lookup(s.entities, e.id) do
      [{_, pid, aggregate, state, _seq, epoch}] when aggregate == e.aggregate ->
        if Process.alive?(pid), do: touched(s, e.id, epoch, {:ok, state}), else: call(s, e, {:read, e.aggregate})

      [{_, pid, other, _, _, _}] ->
        if Process.alive?(pid), do: {:error, {:aggregate_mismatch, other}}, else: call(s, e, {:read, e.aggregate})

      [] ->
        call(s, e, {:read, e.aggregate})
    end
  end

  # Mark the entity as used in this reaper epoch (a write only when the epoch changed).
  defp touched(s, id, epoch, result) do
    now = :atomics.get(s.epoch, 1)
    if epoch != now, do: :ets.update_element(s.entities, id, {6, now})
    result
  end

  @doc "The current state; raises `Kuma.Error` if it cannot be loaded."
  @spec read(t()) :: term()
  def read(%__MODULE__{} = e) do
    case fetch(e) do
      {:ok, state} -> state
      {:error, reason} -> raise Kuma.Error, reason: reason
    end
  end

  @doc """
  Runs a command through the aggregate's `handle/2` and appends its events.

  An idempotent command carries `command_id:` (a binary, unique per command) and
  `since_seq:` (the entity's seq when the command was first prepared, 0 by default): if an
  event of this entity after `since_seq` already carries the id, the command is not run
  again and `{:ok, seq}` answers the entity's current seq. The id is stored in the
  metadata of the command's events (`:command_id`). Checked by the entity's process, so a
  retry queued behind the first attempt is a duplicate too; single node only (cluster
  mode deduplicates retries of its own). `applied?/3` asks without running anything.
  """
  @spec execute(t(), term(), keyword()) ::
          {:ok, non_neg_integer()} | {:ok, non_neg_integer(), Kuma.Position.t()} | {:error, term()}
  def execute(%__MODULE__{} = e, command, opts \\ []) do
    with {:ok, s} <- store(e),
         :ok <- Validate.execute(opts),
         {:ok, opts} <- idempotent(s, opts) do
      opts = Route.command_id(s, opts)
      timeout = Keyword.get(opts, :timeout, EventLog.default_timeout())

      routed(s, e, {:execute, [command, opts]}, timeout, [write: true], fn ->
        call(s, e, {:execute, e.aggregate, command, opts}, timeout)
      end)
    end
  end

  @doc """
  Whether an idempotent command (`execute/3` with `command_id:`) was applied to the entity
  after `since_seq:` (default 0): `{:ok, true | false}`. Answered by the entity's process
  after every write queued before the question, so after a timed-out `execute/3` it says
  for certain whether that command was applied (single node).
  """
  @spec applied?(t(), binary(), keyword()) :: {:ok, boolean()} | {:error, term()}
  def applied?(%__MODULE__{} = e, command_id, opts \\ []) do
    with {:ok, s} <- store(e),
         :ok <- Validate.keys(opts, [:since_seq, :timeout]),
         :ok <- Validate.command_id(command_id: command_id, since_seq: Keyword.get(opts, :since_seq, 0)),
         :ok <- single_node(s) do
      call(
        s,
        e,
        {:applied, command_id, Keyword.get(opts, :since_seq, 0)},
        Keyword.get(opts, :timeout, EventLog.default_timeout())
      )
    end
  end

  # The command id goes into the metadata of the command's events.
  defp idempotent(s, opts) do
    case Keyword.get(opts, :command_id) do
      nil ->
        {:ok, opts}

      id ->
        with :ok <- single_node(s) do
          case Keyword.get(opts, :metadata) do
            nil -> {:ok, Keyword.put(opts, :metadata, %{command_id: id})}
            %{} = meta -> {:ok, Keyword.put(opts, :metadata, Map.put(meta, :command_id, id))}
            _ -> {:error, {:invalid, :metadata, "must be a map for a command with a command_id"}}
          end
        end
    end
  end

  defp single_node(%Store{cluster: nil}), do: :ok
  defp single_node(_s), do: {:error, {:not_supported_in_cluster, "idempotent commands (command_id:)"}}

  @doc "Appends events through the entity's process, folding them into its state."
  @spec append(t(), term() | [term()], keyword()) ::
          {:ok, pos_integer()} | {:ok, pos_integer(), Kuma.Position.t()} | {:error, term()}
  def append(%__MODULE__{} = e, events, opts \\ []) do
    with {:ok, s} <- store(e),
         :ok <- Validate.append(events, opts) do
      opts = Route.command_id(s, opts)
      timeout = Keyword.get(opts, :timeout, EventLog.default_timeout())

      routed(s, e, {:append, [events, opts]}, timeout, [write: true], fn ->
        call(s, e, {:append, e.aggregate, List.wrap(events), opts}, timeout)
      end)
    end
  end

  @doc """
  The state as it was after event `seq: n`, or at time `at: %DateTime{}` (the last event
  committed at or before it), rebuilt from storage (using snapshots where they help).
  The live process is not involved.
  """
  @spec read_at(t(), keyword()) :: {:ok, term()} | {:error, term()}
  def read_at(%__MODULE__{} = e, opts) do
    with {:ok, s} <- store(e),
         :ok <- Validate.keys(opts, [:seq, :at]) do
      routed(s, e, {:read_at, [opts]}, EventLog.default_timeout(), [], fn ->
        with {:ok, seq} <- target_seq(s, e, opts),
             {:ok, loaded} <- Loader.load(s, e.aggregate, e.id, seq) do
          {:ok, loaded.state}
        end
      end)
    end
  end

  defp target_seq(_s, _e, seq: n) when is_integer(n) and n >= 0, do: {:ok, n}

  defp target_seq(s, e, at: %DateTime{} = at) do
    Native.read_seq_at(s.native, e.id, DateTime.to_unix(at, :microsecond))
  end

  defp target_seq(_s, _e, _opts), do: {:error, {:invalid, :read_at, "give exactly one of seq: n or at: %DateTime{}"}}

  @doc """
  The entity's events as `Kuma.Envelope`s, with the aggregate's upcaster applied to `data`.
  Options: `:from` (seq, default 1), `:limit` (default all).
  """
  @spec history(t(), keyword()) :: {:ok, [Kuma.Envelope.t()]} | {:error, term()}
  def history(%__MODULE__{} = e, opts \\ []) do
    with {:ok, s} <- store(e) do
      routed(s, e, {:history, [opts]}, EventLog.default_timeout(), [], fn ->
        with {:ok, events} <- EventLog.events(s, e.id, opts) do
          {:ok, Enum.map(events, &%{&1 | data: Loader.upcast(e.aggregate, &1)})}
        end
      end)
    end
  end

  @doc "Stops the entity's process now (its state is on disk); `:ok` if it was not live."
  @spec passivate(t()) :: :ok | {:error, term()}
  def passivate(%__MODULE__{} = e) do
    with {:ok, s} <- store(e) do
      routed(s, e, {:passivate, []}, EventLog.default_timeout(), [], fn -> passivate_here(s, e) end)
    end
  end

  defp passivate_here(s, e) do
    case GenServer.whereis(Server.via(s.name, e.id)) do
      nil ->
        :ok

      pid ->
        ref = Process.monitor(pid)
        send(pid, {:passivate, :infinity})

        receive do
          {:DOWN, ^ref, :process, _, _} -> :ok
        after
          EventLog.default_timeout() -> {:error, :timeout}
        end
    end
  end

  @doc "Whether the entity is live, and if so its seq and how it was loaded."
  @spec info(t()) :: {:ok, map()} | {:error, term()}
  def info(%__MODULE__{} = e) do
    with {:ok, s} <- store(e) do
      routed(s, e, {:info, []}, EventLog.default_timeout(), [], fn -> info_here(s, e) end)
    end
  end

  defp info_here(s, e) do
    case GenServer.whereis(Server.via(s.name, e.id)) do
      nil ->
        {:ok, %{live: false}}

      pid ->
        try do
          GenServer.call(pid, :info)
        catch
          :exit, _ -> {:ok, %{live: false}}
        end
    end
  end

  # Cluster mode: the call runs on the leader of the entity's shard, where its process
  # lives (Kuma.Cluster.Route); there it runs `local`. Single node: `local` here.
  defp routed(%Store{cluster: nil}, _e, _call, _timeout, _opts, local), do: local.()

  defp routed(s, e, {fun, args}, timeout, opts, local),
    do: Route.run(s, Route.shard(s, e.id), {__MODULE__, fun, [e | args]}, timeout, local, opts)

  @doc false
  # The pid of a live entity (any aggregate), or nil. Used to route store-level appends.
  def whereis(%Store{} = s, id), do: GenServer.whereis(Server.via(s.name, id))

  defp store(%__MODULE__{store: name, aggregate: aggregate}) do
    with {:ok, s} <- Store.lookup(name) do
      if aggregate in s.aggregates, do: {:ok, s}, else: {:error, {:unknown_aggregate, aggregate}}
    end
  end

  # Calls the entity's process, starting it if needed. A process that stops between the
  # lookup and the call (passivated, or stopped to reload) is restarted and called again.
  defp call(s, e, message, timeout \\ EventLog.default_timeout(), attempts \\ 3) do
    with {:ok, pid} <- ensure_started(s, e) do
      try do
        GenServer.call(pid, message, timeout)
      catch
        :exit, {reason, _} when attempts > 1 and reason in [:noproc, :normal] ->
          call(s, e, message, timeout, attempts - 1)

        :exit, {{:shutdown, why}, _} when attempts > 1 and why in [:passivated, :user_code_crashed, :stale] ->
          call(s, e, message, timeout, attempts - 1)

        :exit, {{:shutdown, {:load_failed, reason}}, _} ->
          {:error, reason}

        :exit, {{:shutdown, :not_leader}, _} ->
          # Cluster mode: the shard moved to another node (Kuma.Cluster.Route sends it there).
          {:error, :not_leader}

        :exit, {:timeout, _} ->
          {:error, :timeout}

        :exit, {reason, _} ->
          {:error, {:entity_down, reason}}
      end
    end
  end

  defp ensure_started(s, e) do
    # Fast path: a live entity's pid is in its row of the entity table (one ETS read, no
    # Registry partition hashing); the Registry stays the authority for starting.
    case :ets.lookup(s.entities, e.id) do
      [{_, pid, _, _, _, _}] -> if Process.alive?(pid), do: {:ok, pid}, else: registry_start(s, e)
      [] -> registry_start(s, e)
    end
  end

  defp registry_start(s, e) do
    case GenServer.whereis(Server.via(s.name, e.id)) do
      pid when is_pid(pid) ->
        {:ok, pid}

      nil ->
        supervisor = {:via, PartitionSupervisor, {Store.via(s.name, :entities), e.id}}

        case DynamicSupervisor.start_child(supervisor, {Server, {s.name, e.aggregate, e.id}}) do
          {:ok, pid} -> {:ok, pid}
          {:error, {:already_started, pid}} -> {:ok, pid}
          {:error, reason} -> {:error, {:entity_start_failed, reason}}
        end
    end
  catch
    :exit, _ -> {:error, {:no_store, s.name}}
  end
end
