defmodule Kuma.Error do
  @moduledoc """
  Every reason Kuma returns in `{:error, reason}`, and its text.

  Functions return `{:error, reason}` for bad input and failures, and change nothing then
  (the exceptions are said where they occur: `:timeout`, `{:forget_unconfirmed, pids}`).
  `message/1` (also `Kuma.format_error/1`) turns any reason into a sentence. The few
  functions that cannot return a tuple (enumerating `Kuma.stream/3`, `Kuma.read/1`) raise
  this exception with the same `reason`.

  ## Bad input

  * `{:invalid, what, why}` - a bad argument (`what`: `:entity_id`, `:events`, `:metadata`,
    `:event_type`, `:scope`, `:expected_seq`, `:timeout`, `:data_dir`, `:shards`, `:sync`,
    `:name`, `:store`, `:options`, ...)
  * `{:too_large, what, size, max}` - a documented size limit was exceeded (see `Kuma`)
  * `{:unknown_option, key}` - a misspelled or unsupported option

  ## Stores

  * `:store_closed`, `{:no_store, name}` - the store was stopped / never started
  * `{:already_started, name}` - a store (or projection) with this name is running
  * `{:data_dir_locked, path}` - another store (this VM or another OS process) has the data dir open
  * `{:shard_count_mismatch, stored, requested}` - the data dir was created with another shard count
  * `{:foreign_file, path, why}` - a file where a shard should be is not a shard of this store
  * `{:missing_shard, path}` - a shard file is missing (Kuma never silently recreates one)
  * `{:unsupported_format, found, supported}` - written by a newer Kuma
  * `{:storage, context, message}` - SQLite or the file system failed
  * `{:http, address, posix_reason}` - the `:http` endpoint could not listen (`:eaddrinuse`:
    the port is taken); the store did not start
  * `{:panic, message}` - a bug in Kuma's Rust code was caught; the VM is unaffected
  * `:timeout` - no answer within `:timeout`; the write may still commit

  ## Writes and reads

  * `{:wrong_expected_seq, expected, actual}` - optimistic concurrency conflict
  * `{:partial, results}` - `Kuma.append_batch/3`: some entries were refused (the others committed)
  * `{:corrupt, seq, why}` - stored data failed an integrity check while reading
  * `{:decode_failed, seq, :unknown_atom | :malformed}` - a stored event could not be
    decoded (see `Kuma.Codec`; `stream/3` raises `Kuma.DecodeError` instead)
  * `{:tampered, seq, why}` - `Kuma.verify/2`: the first bad event of a chain
  * `{:tampered, problems}` - `Kuma.verify_store/2`: the first bad event of every broken chain

  ## Entities and aggregates

  * `{:unknown_aggregate, module}` - the store was not started with this aggregate
  * `{:aggregate_mismatch, live}` - the entity is live as another aggregate
  * `{:no_handle, module}` - the aggregate has no `handle/2`
  * `{:user_code_crashed, :handle | :apply, message}` - the aggregate raised; nothing was written
  * `{:replay_failed, seq, message}`, `{:init_failed, 0, message}` - loading the entity failed
  * `{:entity_down, reason}`, `{:entity_start_failed, reason}` - its process exited or could not start

  ## Encryption and erasure

  * `:entity_erased` - the entity was erased (`Kuma.delete/3`): it cannot be written or read
  * `{:subject_erased, id}` - a `Kuma.Sensitive` value names an erased subject
  * `:key_missing` - the entity's data key is not in the keystore although the entity was
    never erased (a keystore restored from an older backup, or copied while the store
    ran): nothing was read or written for it, and no new key was made; put the right
    keystore back
  * `:wrong_master_key`, `{:missing_master_key, why}`, `{:missing_keystore, path}`,
    `{:encryption_mismatch, :store_is_encrypted | :store_is_plain}` - see "Encryption" in `Kuma.start/1`
  * `{:decrypt_failed, seq, why}` - a stored ciphertext did not decrypt (altered, or copied
    from another entity or position); never returned as garbage data
  * `{:forget_unconfirmed, pids}` - `Kuma.delete/3` erased the data but some listeners did not confirm

  ## Cluster mode

  * `{:outcome_unknown, why}` - a write whose leader died or was deposed before it could
    answer, and whose retries (with the same command id) did not get an answer either before
    the timeout: it may or may not have been written, never twice; read the entity to know
  * `:not_leader`, `{:no_leader, why}`, `{:unreachable, node, why}` - the shard's leader
    could not be found or reached before the timeout (a partition, a majority down)
  * `{:not_supported_in_cluster, what}` - not available in cluster mode yet (`Kuma.Cluster`)
  * `{:cluster_mismatch, why}` - this node's settings, or its data dir, belong to another
    cluster (or a cluster's data dir was started without `:cluster`)
  * `{:cluster_not_formed, why}` - within `:start_timeout`, not every seed was reachable to
    create a new cluster, or no majority of them to join an existing one
  * `{:ra_missing, why}` - the Raft library is not installed (run `bin/setup`)
  * `{:raft, reason}`, `{:shard_member_failed, shard, reason}` - Raft refused to start a member
  * `:replicated` - a local write to a store whose shards are replicas (a Kuma bug if seen)
  * `:not_a_cluster` - `Kuma.leave/2`, `Kuma.cluster_info/1` on a single-node store
  * `:seed_cannot_leave` - `Kuma.leave/2` on a node that runs a member of the metadata group
    (a seed) while no other active node can take that member over (start one first)
  * `{:too_few_nodes, left, replicas}` - leaving would leave fewer active nodes than replicas
  * `{:leave_unfinished, shards}` - `Kuma.leave/2` timed out with these shards still here
    (the moves go on; call it again)

  ## Backups (`Kuma.backup/3`, `Kuma.restore/3`)

  * `{:backup_dir_not_empty, dir}`, `{:restore_target_not_empty, dir}` - the target holds files
  * `{:backup_dir, path, posix_reason}` - a backup or restore directory cannot be written or read
  * `{:not_a_backup, path, why}` - no backup manifest there, or an unreadable one
  * `{:backup_format, found, supported}` - a backup written by a newer Kuma
  * `{:backup_damaged, file, frame, why}` - a segment failed a check (frame 0 is its header);
    nothing was restored

  ## Projections and read models

  * `{:unknown_projection, name}` - no projection or read model of that name is running
  * `{:sql, index | nil, message}` - a read model's SQL failed (nothing of it was kept)
  * `{:invalid_schema, module, reason}`, `{:foreign_projection, path, why}` - a read model
    could not start
  * `{:shard_diverged, shard, position, last}` - a projection stopped: the shard no longer
    holds the events it read up to `position` (after an OS crash with `sync: :normal` it
    lost the end of its log and gave those positions out again); rebuild or reset it
  * `:nothing_to_skip`, `:projection_stopped` - `Kuma.Projection.skip/1`, `Kuma.Projection.wait_for/3`
  * `{:raised, text}`, `{:bad_return, callback, value}`, `{:skipped, reason}` - why a
    projection's event failed (in `Kuma.Projection.status/1` and parked events)
  """
  defexception [:reason]

  @type t :: %__MODULE__{reason: term()}

  @impl true
  def message(%{reason: reason}), do: format(reason)

  @doc "A human-readable sentence for any reason Kuma returns (see the moduledoc)."
  @spec format(term()) :: String.t()
  def format({:invalid, what, why}), do: "invalid #{what}: #{why}"
  def format({:too_large, what, size, max}), do: "#{what} too large: #{size} bytes or items, limit #{max}"
  def format({:unknown_option, key}), do: "unknown option #{inspect(key)}"

  def format({:wrong_expected_seq, expected, actual}),
    do: "expected the entity to be at seq #{expected}, but it is at #{actual}; nothing was written"

  def format(:store_closed), do: "the store has been stopped"
  def format({:no_store, name}), do: "no store named #{inspect(name)} is running"
  def format({:already_started, name}), do: "#{inspect(name)} is already running"
  def format({:data_dir_locked, path}), do: "data dir #{path} is in use by another store or OS process"

  def format({:shard_count_mismatch, stored, given}),
    do: "the data dir was created with #{stored} shards, but #{given} were requested"

  def format({:foreign_file, path, why}), do: "#{path} is not a shard of this store: #{why}"
  def format({:missing_shard, path}), do: "shard file #{path} is missing"
  def format({:unsupported_format, found, supported}), do: "format #{found} is newer than supported #{supported}"
  def format({:storage, context, message}), do: "storage error (#{context}): #{message}"
  def format({:corrupt, seq, why}), do: "corrupt event at seq #{seq}: #{why}"

  def format({:decode_failed, seq, :unknown_atom}),
    do: "event #{seq} uses an atom unknown to this VM and the store runs with decode: :safe"

  def format({:decode_failed, seq, _why}), do: "event #{seq} is not a valid term; run Kuma.verify/2"
  def format({:tampered, seq, why}) when is_integer(seq), do: "chain broken at seq #{seq}: #{why}"
  def format({:tampered, problems}) when is_list(problems), do: "#{length(problems)} broken entity chain(s)"
  def format({:panic, message}), do: "internal error in Kuma's native code (the VM is unaffected): #{message}"
  def format({:unknown_aggregate, module}), do: "#{inspect(module)} is not an aggregate of this store"

  def format({:aggregate_mismatch, live}),
    do: "the entity is live as a #{inspect(live)}; entity ids name one stream, whatever the aggregate"

  def format({:no_handle, module}), do: "#{inspect(module)} has no handle/2, so it takes no commands"
  def format({:user_code_crashed, where, message}), do: "#{where} raised (nothing was written): #{message}"
  def format({:replay_failed, seq, message}), do: "replaying event #{seq} failed: #{message}"
  def format({:init_failed, _, message}), do: "init/1 failed: #{message}"
  def format({:entity_down, reason}), do: "the entity's process exited: #{inspect(reason)}"
  def format({:entity_start_failed, reason}), do: "the entity's process could not start: #{inspect(reason)}"
  def format({:partial, results}), do: "#{Enum.count(results, &match?({:error, _}, &1))} batch entries failed"
  def format(:entity_erased), do: "the entity was erased; its id cannot be written or read again"

  def format(:key_missing),
    do:
      "the entity's data key is missing from the keystore although it was never erased " <>
        "(a keystore restored from an older backup?); nothing was read or written"

  def format({:subject_erased, id}), do: "the subject #{inspect(id)} of a sensitive value was erased"
  def format(:wrong_master_key), do: "the master key does not open this store's keystore; nothing was changed"
  def format({:missing_master_key, why}), do: "no master key: #{why}"
  def format({:missing_keystore, path}), do: "the store is encrypted but its keystore #{path} is missing"

  def format({:encryption_mismatch, :store_is_encrypted}),
    do: "the store was created with encryption; it cannot be opened with encryption: false"

  def format({:encryption_mismatch, :store_is_plain}),
    do: "the store was created with encryption: false; it cannot be opened encrypted"

  def format({:decrypt_failed, seq, why}), do: "event #{seq} did not decrypt (altered or misplaced): #{why}"

  def format({:forget_unconfirmed, pids}),
    do: "erased, but #{length(pids)} forget listener(s) did not confirm; call delete again to retry"

  def format({:http, address, :eaddrinuse}),
    do: "cannot serve HTTP on #{address}: the port is in use (pick another http: [port: ...])"

  def format({:http, address, why}), do: "cannot serve HTTP on #{address}: #{:inet.format_error(why)}"

  def format({:backup_dir_not_empty, dir}), do: "#{dir} is not empty: a backup goes into a new or empty directory"

  def format({:restore_target_not_empty, dir}),
    do: "#{dir} is not empty: a restore creates a new data dir (move the old one away first)"

  def format({:backup_dir, path, why}), do: "#{path}: #{:file.format_error(why)}"
  def format({:not_a_backup, path, why}), do: "#{path} is not a Kuma backup: #{why}"

  def format({:backup_format, found, supported}),
    do: "backup format #{found} is not #{supported}, the one this Kuma reads"

  def format({:backup_damaged, file, frame, why}),
    do: "the backup is damaged: #{file}, frame #{frame}: #{why}; nothing was restored"

  def format({:unknown_projection, name}), do: "no projection named #{inspect(name)} is running"
  def format({:sql, nil, message}), do: "SQL failed: #{message}"
  def format({:sql, index, message}), do: "SQL statement #{index} failed: #{message}"
  def format({:foreign_projection, path, why}), do: "#{path} belongs to another store or projection: #{why}"
  def format({:invalid_schema, module, reason}), do: "the schema of #{inspect(module)} failed: #{format(reason)}"

  def format({:shard_diverged, shard, position, last}),
    do:
      "shard #{shard} no longer holds the events this projection read up to position #{position} " <>
        "(it ends at #{last}, or another event took that position: a crash lost the end of its log); " <>
        "rebuild the projection, or reset it"

  def format(:nothing_to_skip), do: "the projection is not stuck on an event"
  def format(:projection_stopped), do: "the projection stopped while waiting"
  def format(:timeout), do: "timed out waiting for the commit; the write may still complete"

  def format({:outcome_unknown, why}),
    do: "the write's outcome is unknown (#{inspect(why)}): it may or may not be written, never twice; read it back"

  def format(:not_leader), do: "no node leads the entity's shard yet (an election is under way); try again"
  def format({:no_leader, why}), do: "the shard's leader could not be found: #{inspect(why)}"
  def format({:unreachable, node, why}), do: "the shard's leader #{node} could not be reached: #{inspect(why)}"
  def format({:not_supported_in_cluster, what}), do: "not available in cluster mode yet: #{what} (see Kuma.Cluster)"
  def format({:cluster_mismatch, why}), do: "this node does not belong to this cluster: #{why}"
  def format({:cluster_not_formed, why}), do: "the cluster could not be formed: #{why}"
  def format({:ra_missing, why}), do: "cluster mode needs the ra library: #{why}"
  def format({:raft, reason}), do: "Raft refused: #{inspect(reason)}"

  def format({:shard_member_failed, shard, reason}),
    do: "shard #{shard}'s Raft member did not start: #{inspect(reason)}"

  def format(:not_a_cluster), do: "the store runs on a single node (no :cluster option)"

  def format(:seed_cannot_leave),
    do: "this node holds the cluster's metadata and no other active node can take it over: start another node first"

  def format({:too_few_nodes, left, replicas}),
    do: "leaving would leave #{left} active nodes for #{replicas} replicas per shard"

  def format({:leave_unfinished, shards}),
    do: "#{length(shards)} shards still have a replica here (the moves go on; call leave again)"

  def format(:replicated), do: "this store's shards are replicas: writes go through their leaders"
  def format({:raised, text}), do: text
  def format({:bad_return, callback, value}), do: "#{callback} returned #{inspect(value, limit: 20)}"
  def format({:skipped, reason}), do: "skipped by an operator after: " <> format(reason)
  def format(other), do: inspect(other)
end
