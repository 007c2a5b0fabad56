defmodule Kuma.Cluster.Consensus.Ra do
  @moduledoc false
  # `Kuma.Cluster.Consensus` on ra (RabbitMQ's Raft library, 2.2.0, unpacked by bin/setup
  # from Debian's rabbitmq-server package into _ra/lib; docs/cluster.md). A member of group
  # `g` on node `n` is the ra server `{g, n}`; a store's groups live in one ra system of
  # their own, its files under <data_dir>/raft.
  @behaviour Kuma.Cluster.Consensus

  @impl true
  def available do
    if Code.ensure_loaded?(:ra) do
      case Application.ensure_all_started(:ra) do
        {:ok, _} -> :ok
        {:error, reason} -> {:error, "ra did not start: #{inspect(reason)}"}
      end
    else
      {:error, "ra is not on the code path: run bin/setup (it unpacks ra 2.2.0 into _ra/lib)"}
    end
  end

  @impl true
  def start_system(system, dir) do
    with :ok <- available(),
         :ok <- File.mkdir_p(dir) do
      config = %{
        name: system,
        names: :ra_system.derive_names(system),
        data_dir: String.to_charlist(dir),
        wal_data_dir: String.to_charlist(dir)
      }

      case :ra_system.start(config) do
        {:ok, _} -> :ok
        {:error, {:already_started, _}} -> :ok
        {:error, reason} -> {:error, {:raft, reason}}
      end
    end
  end

  @impl true
  def ensure_member(system, group, {module, init}, members, opts) do
    id = {group, node()}

    case :ra.restart_server(system, id) do
      :ok ->
        :ok

      {:error, {:already_started, _}} ->
        :ok

      {:error, reason} when reason in [:name_not_registered, :not_found] ->
        uid = :ra.new_uid(Atom.to_string(group))

        config = %{
          cluster_name: group,
          id: id,
          uid: uid,
          initial_members: Enum.map(members, &{group, &1}),
          log_init_args: Map.merge(%{uid: uid}, Map.new(Keyword.take(opts, [:snapshot_interval]))),
          machine: {:module, module, init}
        }

        case :ra.start_server(system, config) do
          :ok -> :ok
          {:error, {:already_started, _}} -> :ok
          {:error, reason} -> {:error, {:raft, reason}}
        end

      {:error, reason} ->
        {:error, {:raft, reason}}
    end
  end

  @impl true
  def trigger_election(group) do
    _ = :ra.trigger_election({group, node()})
    :ok
  catch
    :exit, _ -> :ok
  end

  @impl true
  def stop_member(system, group) do
    _ = :ra.stop_server(system, {group, node()})
    :ok
  end

  @impl true
  def command(group, via, command, timeout) do
    case :ra.process_command({group, via}, command, timeout) do
      {:ok, reply, {_, leader}} -> {:ok, reply, leader}
      {:timeout, {_, node}} -> {:timeout, node}
      {:error, reason} -> {:error, reason}
    end
  catch
    :exit, reason -> {:error, {:exit, reason}}
  end

  @impl true
  def leader(group, via, timeout) do
    case :ra.members({group, via}, timeout) do
      {:ok, _members, {_, leader}} -> {:ok, leader}
      {:timeout, _} -> {:error, :timeout}
      {:error, reason} -> {:error, reason}
    end
  catch
    :exit, reason -> {:error, {:exit, reason}}
  end
end
