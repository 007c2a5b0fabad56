defmodule Kuma.Store.Config do
  @moduledoc false
  # Validates `Kuma.start/1` options into a map. Unknown keys are refused so a typo
  # (`shard: 8`) is an error instead of a silently ignored option. The defaults here are
  # the only ones: `Kuma.Store` is built from this map.

  @defaults %{
    name: :kuma,
    shards: 16,
    sync: :normal,
    decode: :trusted,
    aggregates: [],
    upcasters: [],
    snapshot_every: 100,
    idle_timeout: :timer.minutes(15),
    max_live_entities: 100_000,
    writer_threads: nil,
    tail_bytes: 4_194_304,
    global_order: true,
    encryption: true,
    master_key: nil,
    master_key_file: nil,
    master_key_env: "KUMA_MASTER_KEY",
    keystore_path: nil,
    projections_dir: nil,
    projections: [],
    file_mode: 0o600,
    http: nil,
    cluster: nil
  }
  @known Map.keys(@defaults) ++ [:data_dir]

  def validate(opts) when is_list(opts) do
    with :ok <- Kuma.Validate.keys(opts, @known),
         config = Map.merge(@defaults, Map.new(opts)),
         :ok <- check(:name, config.name),
         :ok <- check(:data_dir, Map.get(config, :data_dir)),
         :ok <- check(:shards, config.shards),
         :ok <- check(:sync, config.sync),
         :ok <- check(:decode, config.decode),
         :ok <- check(:aggregates, config.aggregates),
         :ok <- check(:upcasters, config.upcasters),
         :ok <- check(:snapshot_every, config.snapshot_every),
         :ok <- check(:idle_timeout, config.idle_timeout),
         :ok <- check(:max_live_entities, config.max_live_entities),
         :ok <- check(:writer_threads, config.writer_threads),
         :ok <- check(:tail_bytes, config.tail_bytes),
         :ok <- check(:global_order, config.global_order),
         :ok <- check_path(:keystore_path, config.keystore_path),
         :ok <- check_path(:projections_dir, config.projections_dir),
         :ok <- check(:file_mode, config.file_mode),
         data_dir = Path.expand(to_string(config.data_dir)),
         projections_dir = Path.expand(to_string(config.projections_dir || Path.join(data_dir, "projections"))),
         store = %{name: config.name, data_dir: data_dir, projections_dir: projections_dir, file_mode: config.file_mode},
         {:ok, specs} <- Kuma.Projection.Spec.configured(config.projections, store),
         {:ok, cluster} <- Kuma.Cluster.validate(config.cluster, config.name),
         {:ok, http} <- Kuma.HTTP.options(config.http),
         {:ok, master_key} <- master_key(config) do
      aggregates = Enum.uniq([Kuma.Aggregate.Latest, Kuma.Saga.Log | config.aggregates])
      keystore = config.keystore_path && Path.expand(to_string(config.keystore_path))

      {:ok,
       config
       |> Map.merge(%{
         data_dir: data_dir,
         projections_dir: projections_dir,
         aggregates: aggregates,
         master_key: master_key,
         keystore_path: keystore,
         http: http,
         cluster: cluster
       })
       |> Map.put(:projection_specs, specs)}
    end
  end

  def validate(_opts), do: {:error, {:invalid, :options, "must be a keyword list"}}

  # The master key, resolved once at start from (in order) :master_key, :master_key_file or
  # the environment variable :master_key_env, and handed to Kuma.Keys.Vault: the config
  # holds only the reference that stands for it, so that no state, child spec, error or
  # crash report shows the key's bytes. Resolved last, so that an invalid option leaves
  # nothing in the vault.
  defp master_key(%{encryption: false}), do: {:ok, nil}

  defp master_key(%{encryption: true} = config) do
    cond do
      config.master_key != nil ->
        wrap(Kuma.Keys.parse(config.master_key), :master_key)

      config.master_key_file != nil ->
        case File.read(to_string(config.master_key_file)) do
          {:ok, contents} -> wrap(Kuma.Keys.parse(String.trim(contents)), :master_key_file)
          {:error, reason} -> {:error, {:invalid, :master_key_file, "cannot read: #{:file.format_error(reason)}"}}
        end

      is_binary(config.master_key_env) and System.get_env(config.master_key_env) not in [nil, ""] ->
        wrap(Kuma.Keys.parse(String.trim(System.get_env(config.master_key_env))), :master_key_env)

      true ->
        {:error,
         {:missing_master_key,
          "the store encrypts by default: give :master_key (32 bytes), :master_key_file, or set " <>
            "#{config.master_key_env || "KUMA_MASTER_KEY"} (64 hex characters); or start with encryption: false"}}
    end
  end

  defp master_key(_config), do: {:error, {:invalid, :encryption, "must be true or false"}}

  defp wrap({:ok, key}, _source), do: {:ok, Kuma.Keys.Vault.put(key)}
  defp wrap(:error, source), do: {:error, {:invalid, source, "a key must be 32 raw bytes, 64 hex characters or base64"}}

  defp check(:name, name) when is_atom(name) and name not in [nil, true, false], do: :ok
  defp check(:name, _), do: {:error, {:invalid, :name, "must be an atom"}}
  defp check(:data_dir, nil), do: {:error, {:invalid, :data_dir, "is required"}}

  defp check(:data_dir, dir) when is_binary(dir) and dir != "" do
    if String.valid?(dir), do: :ok, else: {:error, {:invalid, :data_dir, "must be a UTF-8 path"}}
  end

  defp check(:data_dir, dir) when is_list(dir) and dir != [] do
    if List.ascii_printable?(dir) or :io_lib.printable_unicode_list(dir),
      do: :ok,
      else: {:error, {:invalid, :data_dir, "must be a path"}}
  end

  defp check(:data_dir, _), do: {:error, {:invalid, :data_dir, "must be a path"}}
  defp check(:shards, n) when is_integer(n) and n in 1..1024, do: :ok
  defp check(:shards, _), do: {:error, {:invalid, :shards, "must be an integer in 1..1024"}}
  defp check(:sync, s) when s in [:normal, :full], do: :ok
  defp check(:sync, _), do: {:error, {:invalid, :sync, "must be :normal or :full"}}
  defp check(:decode, d) when d in [:trusted, :safe], do: :ok
  defp check(:decode, _), do: {:error, {:invalid, :decode, "must be :trusted or :safe"}}

  defp check(:aggregates, list) when is_list(list) do
    Enum.find_value(list, :ok, fn module ->
      case Kuma.Aggregate.validate(module) do
        :ok -> nil
        error -> error
      end
    end)
  end

  defp check(:aggregates, _), do: {:error, {:invalid, :aggregates, "must be a list of modules"}}

  defp check(:upcasters, list) when is_list(list) do
    if Enum.all?(
         list,
         &(is_function(&1, 2) or (is_atom(&1) and Code.ensure_loaded?(&1) and function_exported?(&1, :upcast, 2)))
       ),
       do: :ok,
       else: {:error, {:invalid, :upcasters, "must be a list of 2-arity functions or modules with upcast/2"}}
  end

  defp check(:upcasters, _), do: {:error, {:invalid, :upcasters, "must be a list"}}
  defp check(:snapshot_every, n) when (is_integer(n) and n > 0) or n == nil, do: :ok
  defp check(:snapshot_every, _), do: {:error, {:invalid, :snapshot_every, "must be a positive integer or nil"}}
  defp check(:idle_timeout, t) when (is_integer(t) and t > 0) or t == :infinity, do: :ok
  defp check(:idle_timeout, _), do: {:error, {:invalid, :idle_timeout, "must be a positive integer (ms) or :infinity"}}
  defp check(:max_live_entities, n) when (is_integer(n) and n > 0) or n == :infinity, do: :ok

  defp check(:max_live_entities, _),
    do: {:error, {:invalid, :max_live_entities, "must be a positive integer or :infinity"}}

  defp check(:writer_threads, n) when (is_integer(n) and n in 1..1024) or n == nil, do: :ok
  defp check(:tail_bytes, n) when is_integer(n) and n in 0..1_099_511_627_776, do: :ok
  defp check(:tail_bytes, _), do: {:error, {:invalid, :tail_bytes, "must be an integer in 0..2^40 (bytes)"}}
  defp check(:writer_threads, _), do: {:error, {:invalid, :writer_threads, "must be an integer in 1..1024 or nil"}}
  defp check(:global_order, b) when is_boolean(b), do: :ok
  defp check(:global_order, _), do: {:error, {:invalid, :global_order, "must be true or false"}}

  # Integer permissions such as 0o600 or 0o640; the owner must be able to read and write.
  defp check(:file_mode, mode) when is_integer(mode) and mode in 0..0o777 and Bitwise.band(mode, 0o600) == 0o600,
    do: :ok

  defp check(:file_mode, _),
    do:
      {:error, {:invalid, :file_mode, "must be permissions such as 0o600 or 0o640, readable and writable by the owner"}}

  # An optional path: nil, or a non-empty UTF-8 string.
  defp check_path(_key, nil), do: :ok

  defp check_path(key, path) when is_binary(path) and path != "" do
    if String.valid?(path), do: :ok, else: {:error, {:invalid, key, "must be a UTF-8 path"}}
  end

  defp check_path(key, _), do: {:error, {:invalid, key, "must be a path (a string)"}}
end
