defmodule Kuma.Backup do
  @moduledoc """
  Online backups and restores (`Kuma.backup/3`, `Kuma.restore/3`).

  A backup is a directory:

  ```
  <dir>/
    BACKUP              the backup's manifest (text), written last
    KUMA.seg            the store's manifest
    subscriptions.seg   persistent subscriptions' positions (if the store has any)
    order.seg           the store-wide order (if the store keeps one)
    shard-000.seg ...   every shard
    keystore.seg        only with `keystore: true`
  ```

  Each `.seg` file is a consistent copy of one SQLite file, taken with SQLite's online
  backup API while writes go on, framed with CRC32 (`native/kuma_core/src/backup.rs` gives
  the layout). The manifest records, per segment, its size, frames and BLAKE3 digest, and
  per shard its last position, its entity and event counts and a digest of every chain's
  head. The files are copied in that order: the store-wide order before the shards (so the
  shards hold every event the order numbered, and a restored store numbers the rest when it
  opens: no hole), the keystore after them (so it holds every key their events need).

  A restore reads every frame of every segment and checks it against the manifest before it
  writes anything, then writes into a temporary directory beside the target, checks each
  shard's heads against the manifest, opens the store there and recomputes every chain
  (`Kuma.verify_store/2`), and only then renames it into place. A damaged backup is refused
  with the first bad frame named (`{:backup_damaged, file, frame, why}`), and nothing is
  left behind.

  ## Backups and erasure

  Backups hold events sealed under each entity's own key. A backup *without* the keystore,
  restored with the store's current keystore (`keystore_path:`), cannot read any entity
  erased since: its key is gone, and its tombstone keeps it erased. A backup *with* the
  keystore (`keystore: true`) can read every entity as it was, erased later or not: keep
  such backups short-lived, or back the keystore up separately and for less long. Neither
  kind holds the master key, nor the read models (`projections/`): they are rebuilt from
  the events after a restore.
  """

  alias Kuma.{Native, Store, Validate}

  @format 1
  @file_name "BACKUP"

  @typedoc "What a backup or restore reports."
  @type report :: %{
          required(:dir) => Path.t(),
          required(:bytes) => non_neg_integer(),
          required(:shards) => [map()],
          required(:keystore) => boolean() | :external,
          required(:seconds) => float(),
          optional(atom()) => term()
        }

  # -- backup -----------------------------------------------------------------------------

  @doc false
  @spec backup(Store.t(), Path.t(), keyword()) :: {:ok, report()} | {:error, term()}
  def backup(%Store{cluster: cluster}, _dir, _opts) when cluster != nil,
    do: {:error, {:not_supported_in_cluster, "Kuma.backup/3 (back up each node's data dir while it is stopped)"}}

  def backup(%Store{} = s, dir, opts) do
    with :ok <- Validate.keys(opts, [:keystore, :on_progress]),
         {:ok, keystore?} <- boolean(opts, :keystore),
         {:ok, progress} <- progress(opts),
         {:ok, dir} <- path(:dir, dir),
         :ok <- empty_target(dir, :backup_dir_not_empty),
         {:ok, tmp} <- temp_dir(dir, "partial", s.file_mode) do
      t0 = System.monotonic_time()

      in_temp_dir(tmp, :backup_failed, fn ->
        segments = backup_plan(s, keystore?)
        total = length(segments)

        entries =
          segments
          |> Enum.with_index(1)
          |> Enum.map(fn {segment, i} ->
            entry = copy(s, tmp, segment)
            progress.(%{phase: :copy, done: i, total: total, segment: entry.file, bytes: entry.bytes})
            entry
          end)

        seconds = seconds_since(t0)
        write_manifest(s, tmp, entries, seconds)
        replace_dir(tmp, dir, :backup_failed)
        {:ok, report(dir, entries, seconds)}
      end)
    end
  end

  # {kind, label, source path}: the store's files, in the order they are copied.
  defp backup_plan(s, keystore?) do
    dir = s.data_dir
    subscriptions = Path.join(dir, "subscriptions.kuma")
    order = Path.join(dir, "order.kuma")

    [{:file, "manifest", Path.join(dir, "KUMA")}] ++
      if(File.exists?(subscriptions), do: [{:db, "subscriptions", subscriptions}], else: []) ++
      if(File.exists?(order), do: [{:db, "order", order}], else: []) ++
      for(i <- 0..(s.shards - 1), do: {:shard, label(i), Store.shard_file(dir, i)}) ++
      if(keystore? and s.keystore_path, do: [{:db, "keystore", s.keystore_path}], else: [])
  end

  defp copy(s, tmp, {kind, label, src}) do
    file = segment_file(label)
    seg = Path.join(tmp, file)

    answer =
      case kind do
        :file ->
          with {:ok, info} <- Native.backup_frame_file(src, seg, label, s.store_id, s.file_mode), do: {:ok, {info, nil}}

        _ ->
          Native.backup_database(src, seg <> ".copy", seg, label, s.store_id, s.file_mode, kind == :shard)
      end

    case answer do
      {:ok, {info, summary}} -> Map.merge(%{file: file, label: label, summary: summary}, info)
      {:error, reason} -> throw({:backup_failed, reason})
    end
  end

  defp report(dir, entries, seconds) do
    %{
      dir: dir,
      bytes: entries |> Enum.map(& &1.bytes) |> Enum.sum(),
      segments: length(entries),
      shards: shard_reports(entries),
      keystore: Enum.any?(entries, &(&1.label == "keystore")),
      seconds: seconds
    }
  end

  # Per shard: its position, entities and events (what the manifest records, less the heads).
  defp shard_reports(segments) do
    for %{summary: %{} = sum, label: "shard-" <> i} <- segments,
        do: sum |> Map.delete(:heads) |> Map.put(:shard, String.to_integer(i))
  end

  defp seconds_since(t0), do: System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1.0e6

  defp write_manifest(s, tmp, entries, seconds) do
    lines =
      [
        "kuma-backup",
        "# Kuma backup manifest: do not edit. See Kuma.Backup.",
        "backup_format #{@format}",
        "store_id #{s.store_id}",
        "shards #{s.shards}",
        "encryption #{if s.encrypted, do: "on", else: "off"}",
        "taken #{DateTime.utc_now() |> DateTime.to_iso8601()}",
        "seconds #{Float.round(seconds, 3)}"
      ] ++ Enum.map(entries, &segment_line/1)

    path = Path.join(tmp, @file_name)

    with :ok <- File.write(path, Enum.join(lines, "\n") <> "\n"),
         :ok <- File.chmod(path, s.file_mode) do
      :ok
    else
      {:error, reason} -> throw({:backup_failed, {:backup_dir, path, reason}})
    end
  end

  defp segment_line(%{file: file, label: label, bytes: b, frames: f, digest: d, summary: sum}) do
    base = "segment #{file} #{label} bytes=#{b} frames=#{f} blake3=#{Base.encode16(d, case: :lower)}"

    case sum do
      nil ->
        base

      %{position: p, entities: e, events: v, heads: h} ->
        base <> " position=#{p} entities=#{e} events=#{v} heads=#{Base.encode16(h, case: :lower)}"
    end
  end

  # -- restore ----------------------------------------------------------------------------

  @doc false
  @spec restore(Path.t(), Path.t(), keyword()) :: {:ok, report()} | {:error, term()}
  def restore(backup_dir, data_dir, opts) do
    with :ok <- Validate.keys(opts, [:master_key, :master_key_file, :keystore_path, :on_progress, :file_mode]),
         {:ok, progress} <- progress(opts),
         {:ok, backup_dir} <- path(:backup_dir, backup_dir),
         {:ok, data_dir} <- path(:data_dir, data_dir),
         {:ok, manifest} <- read_manifest(backup_dir),
         :ok <- keystore_available(manifest, opts),
         :ok <- empty_target(data_dir, :restore_target_not_empty),
         :ok <- check_all(backup_dir, manifest, progress),
         mode = Keyword.get(opts, :file_mode, 0o600),
         {:ok, tmp} <- temp_dir(data_dir, "restore", mode) do
      t0 = System.monotonic_time()

      in_temp_dir(tmp, :restore_failed, fn ->
        unpack(backup_dir, manifest, tmp, mode, opts, progress)
        check_heads(tmp, manifest)
        verified = verify(tmp, manifest, opts, progress)
        replace_dir(tmp, data_dir, :restore_failed)

        {:ok,
         %{
           dir: data_dir,
           bytes: manifest.segments |> Enum.map(& &1.bytes) |> Enum.sum(),
           shards: shard_reports(manifest.segments),
           keystore: keystore_source(manifest, opts),
           events: verified.events,
           entities: verified.entities,
           taken: manifest.taken,
           seconds: seconds_since(t0)
         }}
      end)
    end
  end

  # Every frame of every segment, against the manifest, before anything is written.
  defp check_all(dir, manifest, progress) do
    total = length(manifest.segments)

    manifest.segments
    |> Enum.with_index(1)
    |> Enum.reduce_while(:ok, fn {seg, i}, :ok ->
      with {:ok, info} <-
             Native.backup_read_segment(Path.join(dir, seg.file), seg.label, manifest.store_id, nil, 0o600),
           :ok <- matches(seg, info) do
        progress.(%{phase: :check, done: i, total: total, segment: seg.file, bytes: seg.bytes})
        {:cont, :ok}
      else
        error -> {:halt, error}
      end
    end)
  end

  defp matches(seg, info) do
    cond do
      info.frames != seg.frames or info.bytes != seg.bytes ->
        {:error,
         {:backup_damaged, seg.file, info.frames,
          "holds #{info.frames} frames of #{info.bytes} bytes; the manifest says #{seg.frames} of #{seg.bytes}"}}

      info.digest != seg.digest ->
        {:error,
         {:backup_damaged, seg.file, 1,
          "its content's BLAKE3 differs from the manifest's (a segment of another backup?)"}}

      true ->
        :ok
    end
  end

  defp unpack(dir, manifest, tmp, mode, opts, progress) do
    mkdir(Path.join(tmp, "shards"), mode)
    total = length(manifest.segments)

    manifest.segments
    |> Enum.with_index(1)
    |> Enum.each(fn {seg, i} ->
      case target(tmp, seg.label, opts) do
        nil ->
          :ok

        dest ->
          case Native.backup_read_segment(Path.join(dir, seg.file), seg.label, manifest.store_id, dest, mode) do
            {:ok, _} -> :ok
            {:error, reason} -> throw({:restore_failed, reason})
          end
      end

      progress.(%{phase: :write, done: i, total: total, segment: seg.file, bytes: seg.bytes})
    end)
  end

  defp target(tmp, "manifest", _opts), do: Path.join(tmp, "KUMA")
  defp target(tmp, "order", _opts), do: Path.join(tmp, "order.kuma")
  defp target(tmp, "subscriptions", _opts), do: Path.join(tmp, "subscriptions.kuma")
  defp target(tmp, "shard-" <> i, _opts), do: Store.shard_file(tmp, String.to_integer(i))

  defp target(tmp, "keystore", opts),
    do: if(Keyword.has_key?(opts, :keystore_path), do: nil, else: Path.join(tmp, "keystore.kuma"))

  defp check_heads(tmp, manifest) do
    for %{summary: %{} = expected, label: "shard-" <> i = label} <- manifest.segments do
      case Native.backup_summarize(Store.shard_file(tmp, String.to_integer(i))) do
        {:ok, ^expected} ->
          :ok

        {:ok, got} ->
          throw(
            {:restore_failed,
             {:backup_damaged, segment_file(label), 0,
              "the restored shard ends at position #{got.position} with #{got.entities} chain heads; " <>
                "the manifest says #{expected.position} and #{expected.entities}" <>
                if(got.heads != expected.heads, do: " (the heads differ)", else: "")}}
          )

        {:error, reason} ->
          throw({:restore_failed, reason})
      end
    end
  end

  # Opens the restored store where it was written and recomputes every chain.
  defp verify(tmp, manifest, opts, progress) do
    name = :"kuma_restore_#{System.unique_integer([:positive])}"

    start =
      [
        name: name,
        data_dir: tmp,
        shards: manifest.shards,
        encryption: manifest.encrypted,
        global_order: Enum.any?(manifest.segments, &(&1.label == "order"))
      ] ++ Keyword.take(opts, [:master_key, :master_key_file, :keystore_path, :file_mode])

    case Kuma.start(start) do
      {:ok, _} ->
        try do
          on_shard = fn shard, shards, _report ->
            progress.(%{phase: :verify, done: shard + 1, total: shards, segment: segment_file(label(shard)), bytes: 0})
          end

          case Kuma.verify_store(name, on_progress: on_shard) do
            {:ok, verified} -> verified
            {:error, reason} -> throw({:restore_failed, reason})
          end
        after
          Kuma.stop(name)
        end

      {:error, reason} ->
        throw({:restore_failed, reason})
    end
  end

  # Where the restored store's keystore comes from: `:external` (keystore_path:, used
  # where it is), `true` (the backup's own), `false` (none).
  defp keystore_source(manifest, opts) do
    cond do
      Keyword.has_key?(opts, :keystore_path) -> :external
      Enum.any?(manifest.segments, &(&1.label == "keystore")) -> true
      true -> false
    end
  end

  defp keystore_available(manifest, opts) do
    if manifest.encrypted and keystore_source(manifest, opts) == false,
      do:
        {:error,
         {:invalid, :keystore_path,
          "the backup holds no keystore (taken without keystore: true): give the keystore to restore with, " <>
            "normally the store's current one"}},
      else: :ok
  end

  # -- the manifest -----------------------------------------------------------------------

  @doc false
  # The parsed BACKUP file of `dir`.
  @spec read_manifest(Path.t()) :: {:ok, map()} | {:error, term()}
  def read_manifest(dir) do
    path = Path.join(dir, @file_name)

    case File.read(path) do
      {:ok, text} ->
        parse_manifest(path, text)

      {:error, :enoent} ->
        {:error, {:not_a_backup, dir, "it has no #{@file_name} file (an unfinished or foreign directory?)"}}

      {:error, reason} ->
        {:error, {:backup_dir, path, reason}}
    end
  end

  defp parse_manifest(path, text) do
    lines = text |> String.split("\n", trim: true) |> Enum.reject(&String.starts_with?(&1, "#"))

    with ["kuma-backup" | rest] <- lines,
         fields =
           for(line <- rest, [k, v] <- [String.split(line, " ", parts: 2)], k != "segment", into: %{}, do: {k, v}),
         {format, ""} <- Integer.parse(Map.get(fields, "backup_format", "")),
         :ok <- if(format == @format, do: :ok, else: {:error, {:backup_format, format, @format}}),
         {shards, ""} <- Integer.parse(Map.get(fields, "shards", "")),
         {:ok, segments} <- segments(rest),
         manifest = %{
           store_id: Map.fetch!(fields, "store_id"),
           shards: shards,
           encrypted: Map.get(fields, "encryption") == "on",
           taken: Map.get(fields, "taken"),
           segments: segments
         },
         :ok <- complete(manifest) do
      {:ok, manifest}
    else
      {:error, _} = e -> e
      _ -> {:error, {:not_a_backup, path, "not a Kuma backup manifest, or a damaged one"}}
    end
  rescue
    _ in [KeyError, ArgumentError, MatchError] -> {:error, {:not_a_backup, path, "a field is missing or malformed"}}
  end

  defp segments(lines) do
    segs =
      for "segment " <> rest <- lines do
        [file, label | kvs] = String.split(rest, " ")
        kv = Map.new(kvs, fn pair -> List.to_tuple(String.split(pair, "=", parts: 2)) end)
        int = &String.to_integer(Map.fetch!(kv, &1))
        hex = &Base.decode16!(Map.fetch!(kv, &1), case: :lower)

        summary =
          if Map.has_key?(kv, "heads"),
            do: %{position: int.("position"), entities: int.("entities"), events: int.("events"), heads: hex.("heads")}

        %{
          file: file,
          label: label,
          bytes: int.("bytes"),
          frames: int.("frames"),
          digest: hex.("blake3"),
          summary: summary
        }
      end

    if Enum.all?(segs, &(&1.file == segment_file(&1.label))), do: {:ok, segs}, else: :error
  end

  defp complete(m) do
    labels = MapSet.new(m.segments, & &1.label)
    missing = ["manifest" | Enum.map(0..(m.shards - 1), &label/1)] |> Enum.reject(&MapSet.member?(labels, &1))

    if missing == [],
      do: :ok,
      else: {:error, {:not_a_backup, m.store_id, "the manifest lists no segment for #{Enum.join(missing, ", ")}"}}
  end

  # -- files ------------------------------------------------------------------------------

  defp label(i), do: "shard-" <> String.pad_leading(Integer.to_string(i), 3, "0")
  defp segment_file("manifest"), do: "KUMA.seg"
  defp segment_file(label), do: label <> ".seg"

  defp path(_what, p) when (is_binary(p) and p != "") or (is_list(p) and p != []), do: {:ok, Path.expand(to_string(p))}
  defp path(what, _), do: {:error, {:invalid, what, "must be a path"}}

  defp boolean(opts, key) do
    case Keyword.get(opts, key, false) do
      b when is_boolean(b) -> {:ok, b}
      _ -> {:error, {:invalid, key, "must be true or false"}}
    end
  end

  defp progress(opts) do
    case Keyword.get(opts, :on_progress, fn _ -> :ok end) do
      f when is_function(f, 1) -> {:ok, f}
      _ -> {:error, {:invalid, :on_progress, "must be a function of one argument"}}
    end
  end

  # The target must not exist, or be an empty directory.
  defp empty_target(dir, reason) do
    case File.ls(dir) do
      {:ok, []} ->
        :ok

      {:ok, _} ->
        {:error, {reason, dir}}

      {:error, :enoent} ->
        :ok

      {:error, :enotdir} ->
        if File.regular?(dir), do: {:error, {reason, dir}}, else: {:error, {:backup_dir, dir, :enotdir}}

      {:error, why} ->
        {:error, {:backup_dir, dir, why}}
    end
  end

  # A fresh directory beside `dir` (same file system, so it can be renamed into place); the
  # parents of `dir` are created if missing.
  defp temp_dir(dir, kind, mode) do
    parent = Path.dirname(dir)

    tmp =
      Path.join(parent, ".#{Path.basename(dir)}.#{kind}-#{Base.encode16(:crypto.strong_rand_bytes(4), case: :lower)}")

    with :ok <- File.mkdir_p(parent), :ok <- File.mkdir(tmp), :ok <- File.chmod(tmp, dir_mode(mode)) do
      {:ok, tmp}
    else
      {:error, why} -> {:error, {:backup_dir, parent, why}}
    end
  end

  defp mkdir(dir, mode) do
    with :ok <- File.mkdir_p(dir), :ok <- File.chmod(dir, dir_mode(mode)) do
      :ok
    else
      {:error, why} -> throw({:restore_failed, {:backup_dir, dir, why}})
    end
  end

  # Runs `fun` (work in the temporary directory `tmp`, which throws `{tag, reason}` on
  # failure); on any failure the directory is removed and `{:error, reason}` returned.
  defp in_temp_dir(tmp, tag, fun) do
    result =
      try do
        fun.()
      catch
        {^tag, reason} -> {:error, reason}
      end

    with {:error, _} <- result, do: File.rm_rf(tmp)
    result
  end

  # Searchable where readable, as the store's own directories (sqlite.rs, dir_mode).
  defp dir_mode(file_mode), do: Bitwise.bor(file_mode, Bitwise.band(file_mode, 0o444) |> Bitwise.bsr(2))

  # Renames the finished temporary directory over `dir` (absent, or empty); a failure is
  # thrown as `{tag, reason}`.
  defp replace_dir(tmp, dir, tag) do
    _ = File.rmdir(dir)

    case File.rename(tmp, dir) do
      :ok -> :ok
      {:error, why} -> throw({tag, {:backup_dir, dir, why}})
    end
  end
end
