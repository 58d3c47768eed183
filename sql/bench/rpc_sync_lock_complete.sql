-- pgbench: one lock+complete cycle of an edge agent through sync_agent at the sync's batch size
-- (decision 21: up to 100 per call, at most 50 per master, round-robin across bench-agent's 50
-- masters), then one complete_slave_commands call with the outcomes of all the locked commands.
-- The counters of the other parts (rules, configs, macros, latch) are read first and passed as
-- current, as the agent passes those of its last answer, so each call reads only commands; the
-- commands counter is left out, so each call locks. Role and claims as local settings, as
-- PostgREST sets them per request.
select coalesce(max(rules_seq), 0) as rules_seq, coalesce(max(configs_seq), 0) as configs_seq,
       coalesce(max(macros_seq), 0) as macros_seq, coalesce(max(latch_seq), 0) as latch_seq
  from private.agent_sync_state where agent_id = 'bench-agent' \gset
begin;
select set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', '{"role":"authenticated","sub":"be000000-0000-0000-0000-00000000be01","agent_id":"bench-agent"}', true);
select coalesce(jsonb_agg(jsonb_build_object('command_id', (c ->> 'id')::bigint, 'status', 'completed', 'execution_time_ms', 12))::text, '[]') as batch
  from jsonb_array_elements(coalesce(public.sync_agent(
         jsonb_build_object('rules', :rules_seq, 'configs', :configs_seq, 'macros', :macros_seq, 'latch', :latch_seq),
         null, 50, 100, 30, null) -> 'commands', '[]'::jsonb)) c \gset
commit;
begin;
select set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', '{"role":"authenticated","sub":"be000000-0000-0000-0000-00000000be01","agent_id":"bench-agent"}', true);
select count(*) from public.complete_slave_commands(':batch'::jsonb);
commit;
