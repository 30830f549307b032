{{/* Names: the release's full name, unless it already contains the chart's name. */}}
{{- define "ssh-proxy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ssh-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: proxy
{{- end -}}

{{- define "ssh-proxy.labels" -}}
{{ include "ssh-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ssh-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ssh-proxy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* SSH_TARGET_KEY_SOURCE: defaults from exec.enabled; exec without the permission fails. */}}
{{- define "ssh-proxy.keySource" -}}
{{- $source := .Values.config.keySource | default (ternary "api,exec" "api" .Values.exec.enabled) -}}
{{- if and (not .Values.exec.enabled) (has "exec" (splitList "," (nospace $source))) -}}
{{- fail (printf "config.keySource=%q reads keys by exec, but exec.enabled=false: set config.keySource=api, or exec.enabled=true" $source) -}}
{{- end -}}
{{- $source -}}
{{- end -}}
