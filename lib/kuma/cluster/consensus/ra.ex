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
        {:ok, _} -> drop_orphans(system, dir)
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
          :ok -> sync_directory(system)
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
  def members(group, via, timeout) do
    ra(fn -> :ra.members({group, via}, timeout) end, fn
      {:ok, members, {_, leader}} -> {:ok, Enum.map(members, &elem(&1, 1)), leader}
      {:error, reason} -> {:error, reason}
    end)
  end

  @impl true
  def add_member(group, via, node, timeout) do
    ra(fn -> :ra.add_member({group, via}, {group, node}, timeout) end, fn
      {:ok, _, _} -> :ok
      {:error, :already_member} -> :ok
      {:error, reason} -> {:error, reason}
    end)
  end

  @impl true
  def remove_member(group, via, node, timeout) do
    ra(fn -> :ra.remove_member({group, via}, {group, node}, timeout) end, fn
      {:ok, _, _} -> :ok
      {:error, :not_member} -> :ok
      {:error, reason} -> {:error, reason}
    end)
  end

  # A call to ra whose answers `answer` maps; a timeout, or an exit (the member's node is
  # down, say), becomes `{:error, reason}`.
  defp ra(call, answer) do
    case call.() do
      {:timeout, _} -> {:error, :timeout}
      other -> answer.(other)
    end
  catch
    :exit, reason -> {:error, {:exit, reason}}
  end

  @impl true
  def transfer_leadership(group, from, to) do
    case :ra.transfer_leadership({group, from}, {group, to}) do
      :ok -> :ok
      :already_leader -> :ok
      {:timeout, _} -> {:error, :timeout}
      {:error, reason} -> {:error, reason}
    end
  catch
    :exit, reason -> {:error, {:exit, reason}}
  end

  @impl true
  def delete_member(system, group) do
    case :ra.force_delete_server(system, {group, node()}) do
      :ok -> forget_name(system, group)
      {:error, reason} -> {:error, reason}
      other -> {:error, other}
    end
  end

  # ra 2.2 unregisters a deleted server's name only if the server ran since the VM
  # started; a member deleted before it ever started here (a stale one, at boot) would stay
  # registered, its files gone, and no member of that group could be started here again.
  defp forget_name(system, group) do
    case :ra_system.lookup_name(system, :directory_rev) do
      {:ok, table} ->
        :ok = :dets.delete(table, group)
        :dets.sync(table)

      _ ->
        :ok
    end
  end

  # ra 2.2 records a new member's name -> uid in a dets table saved every 500 ms. A kill
  # -9 before that loses the record: the member is started again as a new one (new uid,
  # empty log, no memory of its term or vote) and its old files stay behind. So the table
  # is saved at once.
  defp sync_directory(system) do
    case :ra_system.lookup_name(system, :directory_rev) do
      {:ok, table} -> :dets.sync(table)
      _ -> :ok
    end
  end

  # A member's files are a directory named by its uid in the system's data dir. One whose
  # uid is not registered belongs to no member (its record was lost, see above, and the
  # member was made again): nothing reads it, and it may hold entries of an erased entity.
  defp drop_orphans(system, dir) do
    registered = MapSet.new(for {_name, uid} <- :ra_directory.list_registered(system), do: to_string(uid))

    for entry <- File.ls!(dir), path = Path.join(dir, entry), File.dir?(path), entry not in registered do
      File.rm_rf!(path)
    end

    :ok
  end

  @impl true
  def local_groups(system) do
    for {name, _uid} <- :ra_directory.list_registered(system), do: name
  catch
    _, _ -> []
  end

  # ra's metrics table (ra_server:metrics/1 in ra 2.2.0): {name, term, snapshot_index,
  # last_applied, commit_index, last_written, commit_latency}.
  @impl true
  def local_status(group) do
    case :ets.lookup(:ra_metrics, group) do
      [{^group, term, snapshot, applied, commit, _written, _latency}] ->
        role =
          case :ets.lookup(:ra_state, group) do
            [{_, role}] -> role
            _ -> :unknown
          end

        %{role: role, term: term, snapshot_index: snapshot, applied_index: applied, commit_index: commit}

      _ ->
        nil
    end
  catch
    :error, :badarg -> nil
  end

  @impl true
  def query(group, via, mfa, timeout) do
    case :ra.leader_query({group, via}, mfa, timeout) do
      {:ok, {_index_term, result}, _leader} -> {:ok, result}
      {:timeout, _} -> {:error, :timeout}
      {:error, reason} -> {:error, reason}
    end
  catch
    :exit, reason -> {:error, {:exit, reason}}
  end

  # ra 2.2.0's own consistent query (`ra:consistent_query/3`) is not used: it counts
  # heartbeat replies by a query index that a follower can carry over from another leader,
  # and can confirm a leader cut off in a minority (changed in later ra releases: "Reset
  # consistent query state on new term", rabbitmq/ra#483). Here each member is asked its
  # current term directly: a local query answers from the member's own process, in order
  # with the votes it casts. The queries to the others go out together
  # (`gen_statem:send_request/2` with the request ra's `ra:local_query/3` makes), so a
  # confirmation costs one round trip and no process.
  @term_query {__MODULE__, :nothing, []}

  @impl true
  def confirm_leader(group, term, timeout) do
    deadline = System.monotonic_time(:millisecond) + timeout

    with {:ok, members, {^group, leader}} when leader == node() <- :ra.members({:local, {group, node()}}, timeout),
         others = for({^group, n} <- members, n != node(), do: n),
         requests =
           Enum.reduce(others, :gen_statem.reqids_new(), fn n, ids ->
             :gen_statem.send_request({group, n}, {:local_query, @term_query}, n, ids)
           end),
         {:ok, {{_applied, ^term}, _}, {^group, leader}} when leader == node() <-
           :ra.local_query({group, node()}, @term_query, timeout) do
      # This member counts, so the others must bring a majority less one. Their answers are
      # taken as they come, and the first majority ends the wait (a member busy taking a
      # snapshot need not be waited for).
      needed = div(length(others) + 1, 2)
      if confirmed(requests, term, needed, deadline), do: :ok, else: {:error, :not_leader}
    else
      _ -> {:error, :not_leader}
    end
  catch
    :exit, _ -> {:error, :not_leader}
  end

  # Whether `needed` of the outstanding requests answer a term no later than `term` before
  # the deadline.
  defp confirmed(_requests, _term, needed, _deadline) when needed <= 0, do: true

  defp confirmed(requests, term, needed, deadline) do
    wait = max(deadline - System.monotonic_time(:millisecond), 0)

    case :gen_statem.receive_response(requests, wait, true) do
      {{:reply, {:ok, {{_applied, t}, _}, _leader}}, _node, requests} when t <= term ->
        confirmed(requests, term, needed - 1, deadline)

      {_other, _node, requests} ->
        confirmed(requests, term, needed, deadline)

      _no_request_or_timeout ->
        false
    end
  end

  @doc false
  # The query `confirm_leader/3` asks each member: only its term (which ra adds) matters.
  def nothing(_machine_state), do: :ok

  # Erasure through ra's files. ra 2.2 keeps entries in its write-ahead log (one per system,
  # shared by its groups) until the file rolls over and its entries are written to the
  # member's segment files; a segment file is deleted once a snapshot lies past its last
  # entry. So: roll the WAL now, note the member's last written index, and (the machine
  # offers a snapshot at every entry past that index, Kuma.Cluster.ShardMachine) the
  # entries are gone once the WAL files that were there are deleted and no segment file
  # starts at or below the erasure's index.
  @impl true
  def purge_begin(system, group) do
    dir = wal_dir(system)
    wals = if dir, do: wal_files(dir), else: []
    upto = with [{^group, _, _, _, _, written, _}] <- :ets.lookup(:ra_metrics, group), do: written, else: (_ -> 0)
    :ok = :ra_log_wal.force_roll_over(:ra_system.derive_names(system).wal)
    %{upto: upto, wals: wals}
  catch
    _, _ -> %{upto: 0, wals: []}
  end

  @impl true
  def purged?(system, group, index, %{wals: wals}) do
    left = wal_files(wal_dir(system))

    Enum.all?(wals, &(&1 not in left)) and
      case uid(system, group) do
        {:ok, uid} ->
          dir = system |> :ra_env.server_data_dir(uid) |> to_string()
          dir |> Path.join("*.segment") |> Path.wildcard() |> Enum.all?(&segment_after?(&1, index))

        :error ->
          true
      end
  catch
    _, _ -> false
  end

  defp wal_dir(system) do
    case :ra_system.fetch(system) do
      %{wal_data_dir: dir} -> dir
      _ -> nil
    end
  end

  defp wal_files(nil), do: []
  defp wal_files(dir), do: dir |> to_string() |> Path.join("*.wal") |> Path.wildcard()

  defp uid(system, group) do
    case :ra_directory.uid_of(system, group) do
      :undefined -> :error
      uid -> {:ok, uid}
    end
  end

  # Whether every entry of a segment file lies after `index` (an empty or vanished file
  # holds none).
  defp segment_after?(path, index) do
    case :ra_log_segment.open(String.to_charlist(path), %{mode: :read}) do
      {:ok, seg} ->
        range = :ra_log_segment.range(seg)
        _ = :ra_log_segment.close(seg)

        case range do
          {from, _to} -> from > index
          _ -> true
        end

      {:error, :enoent} ->
        true

      _ ->
        false
    end
  end

  @impl true
  def running?(group, node) when node == node(), do: Process.whereis(group) != nil

  def running?(group, node) do
    :erpc.call(node, Process, :whereis, [group], 2_000) != nil
  catch
    _, _ -> false
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
