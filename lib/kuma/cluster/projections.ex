defmodule Kuma.Cluster.Projections do
  @moduledoc false
  # Cluster mode: every projection and read model runs once in the cluster, on its owner.
  #
  # The metadata group (Kuma.Cluster.MetaMachine) holds each projection's declaration (kind,
  # module, options), its owner, an epoch that counts owner changes, and, for projections
  # (not read models), a checkpoint. One of these processes runs per store on every node:
  #
  #   * at start it declares the store's `projections:` (the same list on every node: a
  #     declaration that exists already is left as it is);
  #   * every second (and when asked, `ensure/2`) it reads the metadata group and runs the
  #     runners of the projections this node owns, stops the others, and claims the ones
  #     without an owner whose home (`Kuma.Cluster.home/3`: rendezvous hashing over the
  #     active nodes) it is;
  #   * it registers `{:projection_home, name}` in Kuma.Registry with the owner's node, so
  #     that `Kuma.Projection.status/1`, `Kuma.ReadModel.query/4` and the others reach the
  #     projection from any node.
  #
  # The metadata leader's Kuma.Cluster.Rebalancer gives a projection a new owner when its
  # owner leaves, is removed, or stays unreachable for `:projection_failover` ms.
  #
  # What a new owner starts from. Positions are the same on every replica of a shard, so a
  # checkpoint is good on any node. A projection (`Kuma.Projection`) resumes from the
  # checkpoint its last owner saved in the metadata group (at most a second old: events
  # after it are handed over again, as after a restart: at-least-once). A read model keeps
  # its rows and checkpoint in a SQLite file on its owner's node: a new owner builds it
  # again from the first event. A node's projection files carry the epoch they were made
  # in (`<file>.owner`); files from another epoch are deleted before a runner starts (they
  # may hold rows of entities erased meanwhile), and so are the files of a projection
  # this node no longer owns.
  use GenServer
  require Logger

  alias Kuma.{Cluster, Store}
  alias Kuma.Cluster.Meta
  alias Kuma.Projection.{Progress, Spec}

  @sync_ms 1_000

  def child_spec(config),
    do: %{id: __MODULE__, start: {__MODULE__, :start_link, [config]}, shutdown: 30_000}

  def start_link(config),
    do: GenServer.start_link(__MODULE__, config, name: Store.via(config.name, :cluster_projections))

  @doc """
  Declares a projection or read model of the cluster (`Kuma.Projection.start/3` and
  `Kuma.ReadModel.start/3` in cluster mode), gives it an owner, and has the owner start it:
  `{:ok, pid}` of its runner, wherever it runs.
  """
  @spec start(Store.t(), Spec.t(), keyword()) :: {:ok, pid()} | {:error, term()}
  def start(%Store{cluster: c} = s, %Spec{} = spec, opts) do
    decl = %{kind: spec.kind, module: spec.module, opts: opts}

    case Meta.command(c, {:declare_projection, spec.name, decl}) do
      {:ok, :new} ->
        with {:ok, owner, _epoch} <- claim(s, spec.name), do: remote(owner, :ensure, [s.name, spec.name])

      {:ok, :existing} ->
        {:error, {:already_started, spec.name}}

      {:error, reason} ->
        {:error, reason}
    end
  end

  @doc "Removes a projection from the cluster: its owner stops it (its files stay there)."
  @spec stop(Store.t(), atom()) :: :ok | {:error, term()}
  def stop(%Store{cluster: c} = s, name) do
    with :ok <- Meta.command(c, {:undeclare_projection, name}) do
      for node <- [node() | Node.list()], do: remote(node, :ensure, [s.name, nil])
      :ok
    end
  end

  @doc """
  Run on a node: syncs with the metadata group now. With a name, `{:ok, pid}` of that
  projection's runner if this node owns it.
  """
  @spec ensure(atom(), atom() | nil) :: {:ok, pid()} | :ok | {:error, term()}
  def ensure(store, name) do
    GenServer.call(Store.via(store, :cluster_projections), {:ensure, name}, 30_000)
  catch
    :exit, _ -> {:error, {:no_store, store}}
  end

  @doc "The node that runs projection `name`, as this node last heard."
  @spec home(atom()) :: {:ok, node()} | :error
  def home(name) do
    case Registry.lookup(Kuma.Registry, {:projection_home, name}) do
      [{_pid, %{owner: owner}}] when owner != nil -> {:ok, owner}
      _ -> :error
    end
  end

  @doc "The nodes that own projections of `store`, as this node last heard."
  @spec owners(atom()) :: [node()]
  def owners(store) do
    Registry.select(Kuma.Registry, [{{{:projection_home, :_}, :_, %{store: store, owner: :"$1"}}, [], [:"$1"]}])
    |> Enum.reject(&is_nil/1)
    |> Enum.uniq()
  end

  # -- the process ---------------------------------------------------------------------------

  @impl true
  def init(config) do
    Process.flag(:trap_exit, true)
    configured = Enum.map(config.projections || [], &declaration/1)
    send(self(), :sync)
    {:ok, %{store: config.name, configured: configured, running: %{}, homes: %{}, checked: MapSet.new()}}
  end

  defp declaration({module, opts}), do: {module, opts}
  defp declaration(module), do: {module, []}

  @impl true
  def handle_info(:sync, st) do
    Process.send_after(self(), :sync, @sync_ms)
    {:noreply, sync(st)}
  end

  def handle_info({:EXIT, _pid, _reason}, st), do: {:noreply, st}
  def handle_info(_other, st), do: {:noreply, st}

  @impl true
  def handle_call({:ensure, name}, _from, st) do
    st = sync(st)

    reply =
      cond do
        name == nil -> :ok
        match?(%{^name => {_pid, _epoch}}, st.running) -> {:ok, elem(st.running[name], 0)}
        true -> {:error, {:not_started, name}}
      end

    {:reply, reply, st}
  end

  @impl true
  def terminate(_reason, st) do
    for {name, {pid, _}} <- st.running, do: stop_runner(st, name, pid)
    :ok
  end

  defp sync(st) do
    with {:ok, s} <- Store.lookup(st.store),
         {:ok, view} <- Meta.view(s.cluster, 2_000) do
      st = declare_configured(st, s, view)
      up = MapSet.new([node() | Node.list()])
      projections = view.projections

      # Claims: a projection nobody owns yet is taken by its home.
      projections =
        Map.new(projections, fn
          {name, %{owner: nil} = p} ->
            {name, claim_if_home(s, view, up, name, p)}

          other ->
            other
        end)

      st = record_homes(st, projections)

      owned = for {name, %{owner: owner} = p} <- projections, owner == node(), into: %{}, do: {name, p}

      st =
        Enum.reduce(st.running, st, fn {name, {pid, epoch}}, st ->
          case owned do
            %{^name => %{epoch: ^epoch}} ->
              st

            _ ->
              stop_runner(st, name, pid)
              if not Map.has_key?(owned, name), do: drop_files(s, name, projections[name])
              %{st | running: Map.delete(st.running, name)}
          end
        end)

      st =
        Enum.reduce(owned, st, fn {name, p}, st ->
          if Map.has_key?(st.running, name), do: st, else: start_owned(st, s, name, p)
        end)

      drop_others(st, s, projections)
    else
      _ -> st
    end
  end

  defp declare_configured(%{configured: []} = st, _s, _view), do: st

  defp declare_configured(st, s, _view) do
    left =
      Enum.reject(st.configured, fn {module, opts} ->
        with {:ok, spec} <- Spec.new(s, kind(module), module, opts),
             {:ok, _} <- Meta.command(s.cluster, {:declare_projection, spec.name, decl(spec, opts)}) do
          true
        else
          {:error, {:already_started, name}} ->
            Logger.error("projection #{inspect(name)}: another projection of that name runs in the cluster")
            true

          {:error, reason} when is_tuple(reason) and elem(reason, 0) == :invalid ->
            Logger.error("projection #{inspect(module)}: #{Kuma.Error.format(reason)}")
            true

          _ ->
            false
        end
      end)

    %{st | configured: left}
  end

  defp decl(spec, opts), do: %{kind: spec.kind, module: spec.module, opts: opts}

  defp kind(module) do
    if Code.ensure_loaded?(module) and function_exported?(module, :schema, 0), do: :read_model, else: :projection
  end

  defp claim_if_home(s, view, up, name, p) do
    if Cluster.home(view, up, name) == node() do
      case Meta.command(s.cluster, {:own_projection, name, node(), nil}) do
        {:ok, owner, epoch} -> %{p | owner: owner, epoch: epoch}
        _ -> p
      end
    else
      p
    end
  end

  @doc false
  # Gives a projection that has none an owner: its home among the active nodes this node
  # reaches.
  @spec claim(Store.t(), atom()) :: {:ok, node(), non_neg_integer()} | {:error, term()}
  def claim(%Store{cluster: c}, name) do
    with {:ok, view} <- Meta.view(c) do
      case view.projections do
        %{^name => %{owner: nil}} ->
          case Cluster.home(view, MapSet.new([node() | Node.list()]), name) do
            nil -> {:error, :no_active_node}
            home -> Meta.command(c, {:own_projection, name, home, nil})
          end

        %{^name => %{owner: owner, epoch: epoch}} ->
          {:ok, owner, epoch}

        _ ->
          {:error, {:unknown_projection, name}}
      end
    end
  end

  # Kuma.Registry entries `{:projection_home, name}` of this process, one per projection.
  defp record_homes(st, projections) do
    for {name, _} <- st.homes,
        not Map.has_key?(projections, name),
        do: Registry.unregister(Kuma.Registry, {:projection_home, name})

    homes =
      Map.new(projections, fn {name, p} ->
        value = %{store: st.store, owner: p.owner}

        cond do
          Map.get(st.homes, name) == value ->
            :ok

          Map.has_key?(st.homes, name) ->
            Registry.update_value(Kuma.Registry, {:projection_home, name}, fn _ -> value end)

          true ->
            Registry.register(Kuma.Registry, {:projection_home, name}, value)
        end

        {name, value}
      end)

    %{st | homes: homes}
  end

  defp start_owned(st, s, name, p) do
    with {:ok, spec} <- Spec.new(s, p.kind, p.module, p.opts),
         :ok <- fresh_files(s, spec, p.epoch) do
      from = if p.kind == :projection and spec.checkpoint == :durable, do: p.checkpoint, else: %{}
      spec = %{spec | from: from, epoch: p.epoch}

      case Kuma.Projection.Supervisor.start_runner(s, spec) do
        {:ok, pid} ->
          Logger.info("projection #{inspect(name)} runs on this node (owner epoch #{p.epoch})")
          %{st | running: Map.put(st.running, name, {pid, p.epoch})}

        {:error, {:already_started, _}} ->
          st

        {:error, reason} ->
          Logger.error("projection #{inspect(name)} could not start: #{Kuma.Error.format(reason)}")
          st
      end
    else
      {:error, reason} ->
        Logger.error("projection #{inspect(name)} could not start: #{Kuma.Error.format(reason)}")
        st
    end
  end

  defp stop_runner(st, name, pid) do
    _ = Kuma.Projection.Supervisor.stop_runner(st.store, name, pid)
    :ok
  end

  # The files of a projection are kept only for the epoch they were made in.
  defp fresh_files(s, spec, epoch) do
    marker = spec.path <> ".owner"
    expected = "#{s.cluster.id} #{epoch}\n"

    if File.read(marker) == {:ok, expected} do
      :ok
    else
      Progress.delete_files(spec.path)

      with :ok <- File.mkdir_p(Path.dirname(spec.path)),
           :ok <- File.write(marker, expected) do
        :ok
      else
        {:error, reason} -> {:error, {:file, marker, reason}}
      end
    end
  end

  # Files left here by a projection another node owns (this node owned it once, and was
  # down or cut off when it moved) are deleted, once per owner epoch.
  defp drop_others(st, s, projections) do
    checked =
      for {name, %{owner: owner, epoch: epoch} = p} <- projections, owner != node(), into: MapSet.new() do
        unless MapSet.member?(st.checked, {name, epoch}) or Map.has_key?(st.running, name) do
          with {:ok, spec} <- Spec.new(s, p.kind, p.module, p.opts),
               true <- File.exists?(spec.path <> ".owner") do
            drop_files(s, name, p)
          end
        end

        {name, epoch}
      end

    %{st | checked: checked}
  end

  defp drop_files(_s, _name, nil), do: :ok

  defp drop_files(s, name, p) do
    case Spec.new(s, p.kind, p.module, p.opts) do
      {:ok, spec} ->
        Progress.delete_files(spec.path)
        File.rm(spec.path <> ".owner")
        Logger.info("projection #{inspect(name)} moved to #{inspect(p.owner)}: its files here are deleted")

      _ ->
        :ok
    end
  end

  defp remote(node, fun, args) when node == node(), do: apply(__MODULE__, fun, args)

  defp remote(node, fun, args) do
    :erpc.call(node, __MODULE__, fun, args, 30_000)
  catch
    kind, reason -> {:error, {:unreachable, node, {kind, reason}}}
  end
end
