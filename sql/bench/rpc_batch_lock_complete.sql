-- pgbench: one lock+complete cycle of an edge agent through the RPCs, completing through the batch
-- RPC: as rpc_lock_complete.sql (each transaction sets the role and the JWT claims as local
-- settings, as PostgREST does per request), but 2) is one call of
-- complete_slave_commands(p_completions jsonb) with the outcomes of all the locked commands, sent
-- as a JSON literal like a client's request body. The RPC locks commands and slaves in a fixed
-- order itself, so the client need not sort.
\set m random(1, 50)
begin;
select set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', '{"role":"authenticated","sub":"be000000-0000-0000-0000-00000000be01","agent_id":"bench-agent"}', true);
select coalesce(jsonb_agg(jsonb_build_object('command_id', c.id, 'status', 'completed', 'execution_time_ms', 12)
                          order by c.type_rank, c.priority desc, c.created_at, c.id)::text, '[]') as batch
  from public.get_and_lock_slave_commands('bench-master-' || :m, 5, 30) c \gset
commit;
begin;
select set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', '{"role":"authenticated","sub":"be000000-0000-0000-0000-00000000be01","agent_id":"bench-agent"}', true);
select count(*) from public.complete_slave_commands(':batch'::jsonb);
commit;
