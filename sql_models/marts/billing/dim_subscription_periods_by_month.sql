-- Each customer's subscription periods inside a month, with the plan version in force at each period's start.
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id, period_start]
*/
with subscriptions as (
    select * from stg_seeds__subscriptions
),

customers as (
    select * from stg_seeds__customers
),

plans as (
    select * from stg_seeds__plans
),

currencies as (
    select * from stg_seeds__currencies
),

-- a subscription clipped to the month: [period_start, period_end)
periods as (
    select
        customer_id,
        plan_id,
        greatest(start_date, $start_date::date) as period_start,
        least(coalesce(end_date, $end_date::date), $end_date::date) as period_end
    from subscriptions
    where start_date < $end_date::date
        and coalesce(end_date, $end_date::date) > $start_date::date
),

versioned as (
    select
        periods.customer_id,
        periods.plan_id as subscribed_plan_id,
        periods.period_start,
        periods.period_end,
        plans.plan_id,
        plans.plan_version,
        plans.plan_name,
        plans.currency,
        plans.base_fee,
        plans.minimum_charge,
        plans.discount_percent,
        plans.risk_multiplier
    from periods
    left join plans
        on periods.plan_id = plans.plan_id
        and periods.period_start >= plans.effective_from
    qualify row_number() over (
            partition by periods.customer_id, periods.period_start
            order by plans.effective_from desc, plans.plan_version desc
        ) = 1
),

-- a period with no version of its plan in force would bill nothing: fail, never drop it (seed
-- validation rejects a subscription that starts before its plan's first version)
in_force as (
    select
        * replace (
            case
                -- a case, not coalesce: error() is reached only for a null plan_version
                when plan_version is null  -- noqa: ST02
                    then error(
                            'subscription of ' || customer_id || ' to plan ' || subscribed_plan_id || ' from ' || period_start
                            || ': no version of the plan is in force; start it on or after the first version''s effective_from in plans.csv'
                        )
                else plan_version
            end as plan_version
        )
    from versioned
),

final as (
    select
        $start_date::date as month,
        in_force.customer_id,
        customers.customer_name,
        in_force.period_start,
        in_force.period_end,
        date_diff('day', in_force.period_start, in_force.period_end)::bigint as period_days,
        date_diff('day', $start_date::date, $end_date::date)::bigint as month_days,
        ($end_ms - $start_ms)::bigint as month_ms,
        in_force.plan_id,
        in_force.plan_version,
        in_force.plan_name,
        in_force.currency,
        in_force.base_fee,
        in_force.minimum_charge,
        in_force.discount_percent,
        in_force.risk_multiplier,
        currencies.minor_unit_exponent,
        (pow(10, currencies.minor_unit_exponent))::bigint as minor_per_major,
        -- the plan the invoice is headed with: the last period of the month
        row_number() over (partition by in_force.customer_id order by in_force.period_start desc) = 1
            as is_invoice_plan
    from in_force
    inner join customers
        on in_force.customer_id = customers.customer_id
    inner join currencies
        on in_force.currency = currencies.currency
)

select * from final
